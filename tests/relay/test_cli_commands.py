"""The `sealrelay` command line: every command is listed and found, and an admin command
imports what it needs, not the whole relay (IT runs them one after another)."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from sealrelay.cli import COMMANDS, main
from tests.cli_runner import SEALRELAY


def test_every_command_is_listed_and_answers_help() -> None:
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0, listing.output
    listed = [line.split()[0] for line in listing.output.split("Commands:")[1].splitlines() if line]
    assert listed == sorted(COMMANDS)
    for name in COMMANDS:
        shown = runner.invoke(main, [name, "--help"], prog_name="sealrelay")
        assert shown.exit_code == 0, (name, shown.output)
        assert f"Usage: sealrelay {name} " in shown.output


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["users"])
    assert result.exit_code == 2
    assert "No such command 'users'" in result.output


def test_a_user_command_does_not_import_the_relay() -> None:
    """`sealrelay user ...` loads the users and the store, not delivery, webhooks or letters."""
    probe = (
        "import sys\n"
        "from sealrelay.cli import main\n"
        "try:\n"
        "    main(['user', 'list', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(done.stdout.split("\n")[-2].split())
    assert {"sealrelay.commands.user", "gateway.users", "gateway.store.db"} <= loaded
    not_needed = {
        "aiohttp",
        "gateway.outbound.mx",
        "gateway.webhooks.desk",
        "gateway.letters.verification",
        "sealrelay.serve",
        "sealrelay.commands.webhook",
    }
    assert not not_needed & loaded


def test_the_shell_completes_commands_and_subcommands() -> None:
    """What README's `eval "$(_SEALRELAY_COMPLETE=bash_source sealrelay)"` asks the script."""

    def complete(*words: str) -> list[str]:
        done = subprocess.run(
            [str(SEALRELAY)],
            env={
                **os.environ,
                "_SEALRELAY_COMPLETE": "bash_complete",
                "COMP_WORDS": " ".join(("sealrelay", *words)),
                "COMP_CWORD": str(len(words)),
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout.split()

    assert complete("") == [f"plain,{name}" for name in sorted(COMMANDS)]
    assert complete("we") == ["plain,webhook"]
    assert complete("user", "up") == ["plain,upstream-login"]
