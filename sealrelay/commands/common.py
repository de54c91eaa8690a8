"""What every command shares: the --config option, the settings and one run against the database."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import (
    ConfigError,
    Settings,
    load_settings,
    locate_config,
    where_config_is_looked_for,
)
from gateway.store import sequencer
from gateway.store.db import Database

T = TypeVar("T")


class Access(Enum):
    """What a command does to the database, which decides whether it may create one."""

    READ = "read"  # looks only: the database must exist at the current schema
    WRITE = "write"  # changes what is there: the database must exist; migrated first
    CREATE = "create"  # may start a new database (db upgrade, user add, serve)


def config_path(config: Path | None) -> Path | None:
    """The settings file in use; says so on stderr when there is none."""
    try:
        path = locate_config(config)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    if path is None:
        click.echo(
            f"Note: no config file found ({where_config_is_looked_for()});"
            f" using the embedded defaults in {Path.cwd()}",
            err=True,
        )
    return path


@functools.cache  # commands ask more than once; the note about the defaults comes once
def settings_for(config: Path | None) -> Settings:
    try:
        return load_settings(config_path(config))
    except ConfigError as exc:
        for problem in exc.problems[:-1]:
            click.echo(f"Error: config error: {problem}", err=True)
        raise click.ClickException(f"config error: {exc.problems[-1]}") from exc


def run(
    work: Callable[[Database], Awaitable[T]],
    config: Path | None,
    access: Access = Access.READ,
    *,
    refused: tuple[type[Exception], ...] = (),
) -> T:
    """Run one admin action against the configured database.

    Only commands that may start a database create one; the others fail with one line naming
    the database, so a command run without the right config never reports on an empty one.
    The `refused` errors say why the action was not done (an unknown user, a duplicate key):
    they end the command with that one line, not a traceback.
    """
    settings = settings_for(config)

    async def main() -> T:
        if access is not Access.CREATE:
            require_sqlite_file(settings.database.url)
        db = Database.connect(settings.database.url)
        try:
            if access is not Access.CREATE:
                await _require_schema(db, settings.database.url, current=access is Access.READ)
            if access is not Access.READ:
                await db.upgrade()
            done = await work(db)
            if access is not Access.READ:  # what it journaled, chained before it exits
                await sequencer.chain_all(db)
            return done
        except refused as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            await db.close()

    return asyncio.run(main())


def require_sqlite_file(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return  # Settings refuses a SQLite database without a file
    path = Path(parsed.database)
    if not path.is_file():
        raise click.ClickException(
            f"database.url: there is no database at {path.absolute()}; is this the right"
            " config? `sealrelay db upgrade` creates one"
        )


async def _require_schema(db: Database, url: str, *, current: bool) -> None:
    """The database holds sealrelay's tables (at the newest schema, if `current`)."""
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        revisions, newest = await db.schema_revisions()
    except (OSError, SQLAlchemyError) as exc:
        raise click.ClickException(f"database.url: cannot open {shown}: {exc}") from exc
    if not revisions:
        raise click.ClickException(
            f"database.url: {shown} holds no sealrelay tables; is this the right config?"
            " `sealrelay db upgrade` creates them"
        )
    if current and revisions != newest:
        raise click.ClickException(
            f"database.url: {shown} is at schema {', '.join(sorted(revisions))}, this sealrelay"
            f" needs {', '.join(sorted(newest))}: run `sealrelay db upgrade`"
        )


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "-c",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=(
            "TOML settings file. Without it: $SEALRELAY_CONFIG, ./sealrelay.toml,"
            " /etc/sealrelay/sealrelay.toml, else the embedded defaults."
        ),
    )(command)
