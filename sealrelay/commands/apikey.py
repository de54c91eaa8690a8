"""`sealrelay apikey`: keys for the JSON API."""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

import click

from gateway.console.api_keys import ApiKeyDesk, ApiKeyError
from gateway.store.models import ApiKeyScope, utcnow
from sealrelay.commands.common import Access, config_option, run

_run = functools.partial(run, refused=(ApiKeyError,))


@click.group("apikey")
def apikey_group() -> None:
    """Keys for the JSON API (/api/v1)."""


@apikey_group.command("create")
@config_option
@click.argument("name")
@click.option(
    "--scope",
    type=click.Choice([s.value for s in ApiKeyScope]),
    required=True,
    help="read: messages, events, users, queue; write: also change users, queue and keys.",
)
def apikey_create(config: Path | None, name: str, scope: str) -> None:
    """Create a key and print it; it is shown this once and stored only as a hash."""
    made = _run(
        lambda db: ApiKeyDesk(db, utcnow).create(name, ApiKeyScope(scope), "cli"),
        config,
        Access.WRITE,
    )
    click.echo(f"created {made.info.scope} key {made.info.id} ({made.info.name})", err=True)
    click.echo("the key is shown once; store it now:", err=True)
    click.echo(made.key)


@apikey_group.command("list")
@config_option
def apikey_list(config: Path | None) -> None:
    """Every key: id, prefix, scope, name, created, last used, revoked."""
    keys = _run(lambda db: ApiKeyDesk(db, utcnow).listing(), config)
    if not keys:
        click.echo("no API keys")

    def when(at: datetime | None) -> str:
        return f"{at:%Y-%m-%d %H:%M}Z" if at is not None else "-"

    for key in keys:
        revoked = f"  REVOKED {when(key.revoked_at)}" if key.revoked_at else ""
        click.echo(
            f"{key.id}  {key.prefix}…  {key.scope:<5}  {key.name}  created {when(key.created_at)}"
            f"  last used {when(key.last_used_at)}{revoked}"
        )


@apikey_group.command("revoke")
@config_option
@click.argument("key_id")
def apikey_revoke(config: Path | None, key_id: str) -> None:
    """Revoke a key at once; clients using it get 401 from then on."""
    revoked = _run(lambda db: ApiKeyDesk(db, utcnow).revoke(key_id, "cli"), config, Access.WRITE)
    click.echo(f"revoked {revoked.id} ({revoked.name})")
