"""The `sealrelay` command: run the relay and administer users, queue, keys and journal."""

from __future__ import annotations

import importlib

import click

# Each command's module is imported when that command runs: `sealrelay user list` loads the
# users and the store, not the MX resolver, the webhook sender or the letter verifier.
COMMANDS = {
    "apikey": "apikey:apikey_group",
    "check-config": "relay:check_config",
    "db": "relay:db",
    "demo-agent": "relay:demo_agent",
    "dkim": "dkim:dkim_group",
    "evidence": "evidence:evidence",
    "links": "links:links_group",
    "queue": "queue:queue_group",
    "serve": "relay:serve",
    "user": "user:user",
    "verify": "evidence:verify",
    "webhook": "webhook:webhook_group",
}


class CommandsOnDemand(click.Group):
    """Click's lazily loading group: a command's module is imported when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(f"sealrelay.commands.{module}"), name)
        assert isinstance(command, click.Command) and command.name == cmd_name, target
        return command


@click.group(cls=CommandsOnDemand)
@click.version_option(package_name="sealrelay", message="%(prog)s %(version)s")
def main() -> None:
    """sealrelay: the outbound SMTP relay for brokerages."""
