"""Running the relay, checking its settings, the schema and the demo agent."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from pathlib import Path

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gateway import config_check, users
from gateway.config import Settings
from gateway.mail import dkim
from gateway.outbound.routes import describe_routes
from gateway.problems import Problem
from gateway.store import sqlite_backup
from gateway.store.db import Database
from sealrelay import log_lines
from sealrelay.commands.common import (
    Access,
    config_option,
    config_path,
    require_sqlite_file,
    run,
    settings_for,
)

log = logging.getLogger(__name__)
DEMO_AGENT = "agent@demo.sealrelay.example"
_run = functools.partial(run, refused=(users.UserError,))


@click.command()
@config_option
@click.option(
    "--roles",
    default="smtp,web,worker",
    show_default=True,
    help="Which parts this instance runs, comma-separated.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=None,
    help="Relay processes sharing the listening ports, one per core (default: [server]"
    " processes, 1), sharing one database.",
)
def serve(config: Path | None, roles: str, processes: int | None) -> None:
    """Run the relay until SIGTERM or Ctrl-C."""
    from gateway.memory import return_big_buffers
    from sealrelay import serve as serving
    from sealrelay.serve import Relay

    return_big_buffers()

    chosen = [r.strip() for r in roles.split(",") if r.strip()]
    path = config_path(config)
    # A bucket out of reach is no reason not to start: the relay runs degraded until it answers.
    settings, problems = config_check.check_config(path, reach_bucket=False)
    if settings is not None:
        if processes is not None:
            server = settings.server.model_copy(update={"processes": processes})
            settings = settings.model_copy(update={"server": server})
            problems = [p for p in problems if p.key != "server.processes"]
        problems += config_check.listen_problems(settings, chosen)
    _stop_on_errors(problems)
    assert settings is not None
    count = settings.server.processes
    log_lines.configure(count)
    log.info("config: %s", path.absolute() if path else "the embedded defaults (no file found)")
    for problem in problems:
        log.warning("config: %s", problem)

    if count > 1:
        from sealrelay.processes import StartFailed, serve_processes

        try:
            serve_processes(settings, chosen, count)
        except (StartFailed, ValueError, RuntimeError, OSError, dkim.DkimError) as exc:
            raise click.ClickException(str(exc)) from exc
        return

    async def relay_until_stopped() -> None:
        relay = Relay(settings, roles=chosen)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, relay.request_stop, signal.Signals(signum).name)
        try:
            await relay.serve_forever()
        finally:
            await relay.stop()

    try:
        serving.run(relay_until_stopped())
    except (ValueError, RuntimeError, OSError, dkim.DkimError) as exc:
        raise click.ClickException(str(exc)) from exc
    # Stopped, the database closed. Left alone, the interpreter's last garbage collections
    # walk every object the libraries made (1.5-2.5 s measured); the memory goes back to
    # the system at exit anyway, so they are spared.
    gc.freeze()


def _stop_on_errors(problems: list[Problem]) -> None:
    """Every error on its own line, naming key and path; exit 1 if there was one."""
    errors = [problem for problem in problems if problem.error]
    if not errors:
        return
    for problem in errors[:-1]:
        click.echo(f"Error: config error: {problem}", err=True)
    raise click.ClickException(f"config error: {errors[-1]}")


@click.command("check-config")
@config_option
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def check_config(config: Path | None, file: Path | None) -> None:
    """Check a settings file and everything it names; report every problem at once.

    FILE (or --config) is found as for every command. Errors exit 1; warnings do not.
    """
    if file is not None and not file.is_file():
        raise click.ClickException(f"config error: {file}: no such file")
    path = config_path(file or config)
    settings, problems = config_check.check_config(path)
    if settings is not None and not any(p.error and p.key == "database.url" for p in problems):
        problems += _user_group_problems(settings)
    for problem in problems:
        if not problem.error:
            click.echo(f"Warning: {problem}", err=True)
    _stop_on_errors(problems)
    assert settings is not None
    click.echo(
        f"{path or 'embedded defaults'}: ok (smtp {', '.join(settings.smtp.listen)};"
        f" web {settings.web.listen}; upstream {settings.upstream.url};"
        f" dkim for {len(settings.dkim)} domain(s))"
    )
    if settings.routes:
        for line in describe_routes(settings):
            click.echo(f"  {line}")


def _user_group_problems(settings: Settings) -> list[Problem]:
    """Users whose group the settings do not know, if the database is there to ask."""

    async def groups() -> dict[str, str]:
        db = Database.connect(settings.database.url)
        try:
            current, _ = await db.schema_revisions()
            if not current:
                return {}
            return {
                account.email: account.group_name
                for account, _ in await users.list_users(db)
                if account.group_name
            }
        finally:
            await db.close()

    try:
        require_sqlite_file(settings.database.url)
    except click.ClickException:
        return []  # not created yet: `serve` will
    try:
        return config_check.unknown_group_problems(settings, asyncio.run(groups()))
    except (OSError, SQLAlchemyError) as exc:
        shown = make_url(settings.database.url).render_as_string(hide_password=True)
        return [Problem("database.url", f"cannot open {shown}: {exc}")]


@click.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config: Path | None) -> None:
    """Apply all migrations (serve does this at start too)."""

    async def noop(_: Database) -> None:
        return None

    _run(noop, config, Access.CREATE)
    click.echo("database is up to date")


@db.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@config_option
def db_backup(destination: Path, config: Path | None) -> None:
    """Copy the SQLite database to DESTINATION, a new file, while the relay runs.

    A consistent snapshot, checked before it gets its name. Copy the blob store and the key
    files after it (docs/deployment.md, Backups); PostgreSQL is backed up with pg_dump.
    """
    settings = settings_for(config)
    url = make_url(settings.database.url)
    if url.get_backend_name() != "sqlite":
        raise click.ClickException(
            f"database.url is {url.render_as_string(hide_password=True)}: back it up with"
            " pg_dump --format=custom (docs/deployment.md, Backups)"
        )
    require_sqlite_file(settings.database.url)
    source = Path(url.database or "")
    try:
        size = sqlite_backup.backup(source, destination)
    except sqlite_backup.BackupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{destination}: {size} bytes, a checked copy of {source}; now copy the blob store"
        f" ({settings.storage.url or settings.storage.path}) and the key files"
        " (docs/deployment.md, Backups)"
    )


@click.command("demo-agent")
@config_option
def demo_agent(config: Path | None) -> None:
    """Create the demo agent, or give it a fresh password, and print the credentials."""
    password = users.generate_password()

    async def ensure(db: Database) -> None:
        try:
            await users.add_user(db, DEMO_AGENT, password)
        except users.UserError:
            await users.set_password(db, DEMO_AGENT, password)

    _run(ensure, config, Access.CREATE)
    click.echo(f"demo agent: {DEMO_AGENT}  password: {password}")
