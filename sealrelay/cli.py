"""The `sealrelay` command: run the relay and administer users, queue, keys and journal."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gateway import config_check, users
from gateway.agent_logins import AgentLogins, LoginKeyMissing, key_path
from gateway.config import (
    ConfigError,
    NoticeSettings,
    Settings,
    load_settings,
    locate_config,
    where_config_is_looked_for,
)
from gateway.console import totp
from gateway.console.api_keys import ApiKeyDesk, ApiKeyError
from gateway.letters import verification
from gateway.mail import dkim
from gateway.outbound import queue
from gateway.outbound.routes import describe_routes
from gateway.problems import Problem
from gateway.store import journal, sequencer, sweeper
from gateway.store.db import Database
from gateway.store.models import (
    ApiKeyScope,
    Delivery,
    DeliveryStatus,
    Role,
    WebhookEndpoint,
    utcnow,
)
from gateway.webhooks.desk import Created, DeliveryView, WebhookDesk, WebhookError
from sealrelay import log_lines

log = logging.getLogger(__name__)
T = TypeVar("T")
DEMO_AGENT = "agent@demo.sealrelay.example"


class Access(Enum):
    """What a command does to the database, which decides whether it may create one."""

    READ = "read"  # looks only: the database must exist at the current schema
    WRITE = "write"  # changes what is there: the database must exist; migrated first
    CREATE = "create"  # may start a new database (db upgrade, user add, serve)


def _config_path(config: Path | None) -> Path | None:
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
def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(_config_path(config))
    except ConfigError as exc:
        for problem in exc.problems[:-1]:
            click.echo(f"Error: config error: {problem}", err=True)
        raise click.ClickException(f"config error: {exc.problems[-1]}") from exc


def _run(
    work: Callable[[Database], Awaitable[T]], config: Path | None, access: Access = Access.READ
) -> T:
    """Run one admin action against the configured database.

    Only commands that may start a database create one; the others fail with one line naming
    the database, so a command run without the right config never reports on an empty one.
    """
    settings = _settings(config)

    async def main() -> T:
        if access is not Access.CREATE:
            _require_sqlite_file(settings.database.url)
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
        except (users.UserError, queue.QueueError, ApiKeyError, WebhookError) as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            await db.close()

    return asyncio.run(main())


def _require_sqlite_file(url: str) -> None:
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


@click.group()
def main() -> None:
    """sealrelay: the outbound SMTP relay for brokerages."""


@main.command()
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
    path = _config_path(config)
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

    async def run() -> None:
        relay = Relay(settings, roles=chosen)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, relay.request_stop, signal.Signals(signum).name)
        try:
            await relay.serve_forever()
        finally:
            await relay.stop()

    try:
        serving.run(run())
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


@main.command("check-config")
@config_option
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def check_config(config: Path | None, file: Path | None) -> None:
    """Check a settings file and everything it names; report every problem at once.

    FILE (or --config) is found as for every command. Errors exit 1; warnings do not.
    """
    if file is not None and not file.is_file():
        raise click.ClickException(f"config error: {file}: no such file")
    path = _config_path(file or config)
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
        _require_sqlite_file(settings.database.url)
    except click.ClickException:
        return []  # not created yet: `serve` will
    try:
        return config_check.unknown_group_problems(settings, asyncio.run(groups()))
    except (OSError, SQLAlchemyError) as exc:
        shown = make_url(settings.database.url).render_as_string(hide_password=True)
        return [Problem("database.url", f"cannot open {shown}: {exc}")]


@main.group()
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


@main.group()
def user() -> None:
    """Agents and admins."""


def _password(from_stdin: bool) -> tuple[str, bool]:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    return users.generate_password(), True


@user.command("add")
@config_option
@click.argument("email")
@click.option("--admin", is_flag=True, help="Short for --role admin.")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=None,
    help="agent (the default: own messages), team_lead (the group's messages), admin, or"
    " auditor (reads everything, changes nothing).",
)
@click.option("--group", default=None, help="The group whose settings apply to this agent.")
@click.option("--alias", "aliases", multiple=True, help="Another address the agent sends from.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(
    config: Path | None,
    email: str,
    admin: bool,
    role: str | None,
    group: str | None,
    aliases: tuple[str, ...],
    password_stdin: bool,
) -> None:
    """Create a user; prints a generated password unless one comes on stdin."""
    if admin and role not in (None, Role.ADMIN):
        raise click.UsageError("--admin and --role name different roles; give one of them")
    chosen = Role.ADMIN if admin else Role(role or Role.AGENT)
    password, generated = _password(password_stdin)
    created = _run(
        lambda db: users.add_user(db, email, password, role=chosen, group=group, aliases=aliases),
        config,
        Access.CREATE,
    )
    click.echo(f"created {chosen} {created.email}")
    known = {g.name for g in _settings(config).groups}
    if group is not None and group not in known:
        click.echo(
            f"Warning: group {group!r} is not in the config's [[groups]];"
            " the [policy] defaults apply to this agent until it is",
            err=True,
        )
    if generated:
        click.echo(f"password: {password}")


@user.command("list")
@config_option
def user_list(config: Path | None) -> None:
    """All users with their aliases; an optional mail a user gets or not, unlike the
    default of their group or installation ([notices]), shows as a flag: no-first-download,
    expiry-warning."""
    settings = _settings(config)
    listed = _run(users.list_users, config)
    if not listed:
        click.echo("no users; add one with: sealrelay user add EMAIL")
    for account, aliases in listed:
        defaults = settings.notices_for(account.group_name)
        prefs = users.NoticePrefs.of(account.notify, defaults)
        flags = [account.role, *_notice_flags(prefs, defaults)]
        if account.disabled:
            flags.append("disabled")
        if account.group_name:
            flags.append(f"group={account.group_name}")
        if account.totp_secret:
            flags.append("totp")
        alias_text = f"  aliases: {', '.join(aliases)}" if aliases else ""
        click.echo(f"{account.email}  [{' '.join(flags)}]{alias_text}")


def _notice_flags(prefs: users.NoticePrefs, defaults: NoticeSettings) -> list[str]:
    return [
        ("" if getattr(prefs, kind) else "no-") + kind.replace("_", "-")
        for kind in users.NOTICE_KINDS
        if getattr(prefs, kind) != getattr(defaults, kind)
    ]


@user.command("notify")
@config_option
@click.argument("email")
@click.option(
    "--first-download",
    type=click.Choice(["on", "off"]),
    default=None,
    help="A mail when a recipient downloads a file for the first time.",
)
@click.option(
    "--expiry-warning",
    type=click.Choice(["on", "off"]),
    default=None,
    help="A mail when a registered letter still waits for consent shortly before it expires.",
)
def user_notify(
    config: Path | None, email: str, first_download: str | None, expiry_warning: str | None
) -> None:
    """Choose the optional mails an agent gets; without options, show them.

    The consent confirmation is not optional: it carries the evidence of the consent.
    """
    settings = _settings(config)
    changes = {
        kind: value == "on"
        for kind, value in (("first_download", first_download), ("expiry_warning", expiry_warning))
        if value is not None
    }
    if changes:
        prefs = _run(
            lambda db: users.set_notifications(db, email, changes, settings), config, Access.WRITE
        )
    else:
        prefs = _run(lambda db: users.notifications(db, email, settings), config)
    click.echo(
        f"{email}: first-download {'on' if prefs.first_download else 'off'},"
        f" expiry-warning {'on' if prefs.expiry_warning else 'off'},"
        " consent confirmation always"
    )


@user.command("disable")
@config_option
@click.argument("email")
def user_disable(config: Path | None, email: str) -> None:
    """Stop a user from logging in (their queued mail still goes out)."""
    _run(lambda db: users.set_disabled(db, email, True), config, Access.WRITE)
    click.echo(f"disabled {email}")


@user.command("enable")
@config_option
@click.argument("email")
def user_enable(config: Path | None, email: str) -> None:
    """Let a disabled user log in again."""
    _run(lambda db: users.set_disabled(db, email, False), config, Access.WRITE)
    click.echo(f"enabled {email}")


@user.command("passwd")
@config_option
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_passwd(config: Path | None, email: str, password_stdin: bool) -> None:
    """Set a new password (their console sessions end); prints a generated one unless one
    comes on stdin."""
    password, generated = _password(password_stdin)
    _run(lambda db: users.set_password(db, email, password), config, Access.WRITE)
    click.echo(f"password changed for {email}")
    if generated:
        click.echo(f"password: {password}")


@user.command("delete")
@config_option
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def user_delete(config: Path | None, email: str, yes: bool) -> None:
    """Delete a user: sign-in, sessions, aliases and notices end; their messages and the
    journal stay, and the address stays reserved for them. Use `disable` to pause someone."""
    if not yes:
        click.confirm(f"Delete {email} for good (their messages stay)?", abort=True)
    _run(lambda db: users.delete_user(db, email, by="cli"), config, Access.WRITE)
    click.echo(f"deleted {email}")


@user.group("alias")
def user_alias() -> None:
    """The other addresses a user may send from."""


@user_alias.command("add")
@config_option
@click.argument("email")
@click.argument("address")
def user_alias_add(config: Path | None, email: str, address: str) -> None:
    """Let EMAIL also send from ADDRESS."""
    aliases = _run(lambda db: users.add_alias(db, email, address, by="cli"), config, Access.WRITE)
    click.echo(f"{email} may send from: {', '.join(aliases)}")


@user_alias.command("remove")
@config_option
@click.argument("email")
@click.argument("address")
def user_alias_remove(config: Path | None, email: str, address: str) -> None:
    """Stop EMAIL sending from ADDRESS."""
    aliases = _run(
        lambda db: users.remove_alias(db, email, address, by="cli"), config, Access.WRITE
    )
    click.echo(f"{email} may send from: {', '.join(aliases) or 'no alias'}")


@user.group("upstream-login")
def user_upstream_login() -> None:
    """An agent's own login at their mail host, for hosts that refuse other From addresses
    (docs/agent-logins.md)."""


def _agent_logins(config: Path | None, work: Callable[[AgentLogins], Awaitable[T]]) -> T:
    settings = _settings(config)

    async def run(db: Database) -> T:
        try:
            return await work(AgentLogins.from_settings(settings, db))
        except LoginKeyMissing as exc:
            raise click.ClickException(str(exc)) from exc

    return _run(run, config, Access.WRITE)


@user_upstream_login.command("set")
@config_option
@click.argument("email")
@click.option("--url", required=True, help="smtp://HOST[:PORT] (STARTTLS) or smtps://HOST[:PORT].")
@click.option("--username", required=True, help="The login name at the mail host.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_upstream_login_set(
    config: Path | None, email: str, url: str, username: str, password_stdin: bool
) -> None:
    """EMAIL's mail leaves through this login; the password is asked for (never an argument)
    and stored sealed."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password at the mail host", hide_input=True)
    _agent_logins(config, lambda desk: desk.set(email, url, username, password, by="cli"))
    click.echo(f"{email} now sends through {username} at {url.strip()}")


@user_upstream_login.command("clear")
@config_option
@click.argument("email")
def user_upstream_login_clear(config: Path | None, email: str) -> None:
    """EMAIL's mail leaves the default way again."""
    cleared = _agent_logins(config, lambda desk: desk.clear(email, by="cli"))
    click.echo(f"{email}: upstream login removed" if cleared else f"{email} had no upstream login")


@user_upstream_login.command("show")
@config_option
@click.argument("email")
def user_upstream_login_show(config: Path | None, email: str) -> None:
    """Where EMAIL's mail leaves through, without the password."""
    view = _agent_logins(config, lambda desk: desk.show(email))
    if view is None:
        click.echo(f"{email}: no upstream login (mail leaves the default way)")
        return
    click.echo(f"{email}: {view.username} at {view.url}, set {view.updated_at:%Y-%m-%d %H:%M} UTC")


@user_upstream_login.command("rotate-key")
@config_option
def user_upstream_login_rotate_key(config: Path | None) -> None:
    """Seal every stored login with a new key ([secrets] key_file); the old key is kept
    beside it as .old. Back up the new key; run again if it was interrupted."""
    count = _agent_logins(config, lambda desk: desk.rotate_key())
    path = key_path(_settings(config))
    click.echo(f"{count} upstream logins sealed with the new key {path}; back it up")
    click.echo(f"the old key is kept at {path}.old: delete it once the backup has the new one")


@user.command("totp")
@config_option
@click.argument("email")
@click.option("--off", is_flag=True, help="Stop asking this user for a code.")
def user_totp(config: Path | None, email: str, off: bool) -> None:
    """Ask for a TOTP code at console sign-in: prints a new secret and its otpauth:// URI once.

    Running it again replaces the secret (the old authenticator entry stops working).
    """
    if off:
        _run(lambda db: totp.disable(db, email), config, Access.WRITE)
        click.echo(f"TOTP off for {email}")
        return
    issuer = _settings(config).branding.company_name
    setup = _run(lambda db: totp.enable(db, email, issuer), config, Access.WRITE)
    click.echo(f"TOTP on for {email}; add it to an authenticator app (shown only now):")
    click.echo(f"uri: {setup.uri}")
    click.echo(f"secret: {setup.secret}")


@main.command("demo-agent")
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


@main.group("queue")
def queue_group() -> None:
    """The outbound queue."""


@queue_group.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Include delivered, bounced, deleted.")
def queue_list(config: Path | None, show_all: bool) -> None:
    """Messages with copies waiting for delivery, each copy under its message's id."""
    statuses = list(DeliveryStatus) if show_all else [DeliveryStatus.QUEUED]

    async def fetch(db: Database) -> list[queue.Claimed]:
        async with db.transaction() as session:
            return await queue.list_deliveries(session, statuses)

    rows = _run(fetch, config)
    if not rows:
        click.echo("the queue is empty")
    by_message: dict[str, list[queue.Claimed]] = {}
    for row in rows:
        by_message.setdefault(row.message.id, []).append(row)
    for copies in by_message.values():
        m = copies[0].message
        click.echo(
            f"{m.id}  {m.received_at:%Y-%m-%d %H:%M:%S}Z  {m.sender or '<>'}  {m.subject[:40]!r}"
        )
        for copy in copies:
            d = copy.delivery
            error = f"  last error: {d.last_error}" if d.last_error else ""
            click.echo(
                f"    {d.status:<9} {d.recipient}  attempts={d.attempts}"
                f"  next={d.next_attempt_at:%Y-%m-%d %H:%M:%S}Z{error}"
            )


@queue_group.command("retry")
@config_option
@click.argument("message_id")
@click.argument("recipients", nargs=-1)
def queue_retry(config: Path | None, message_id: str, recipients: tuple[str, ...]) -> None:
    """Try a message's queued (or bounced) copies again now; only to RECIPIENTS if given."""
    from sealrelay.serve import blob_store

    settings = _settings(config)
    lifetime = timedelta(seconds=settings.upstream.queue_lifetime)

    async def retry(db: Database) -> list[Delivery]:
        async with db.snapshot() as session:
            copies = _named(
                await queue.copies_of(session, message_id, recipients),
                message_id,
                recipients,
                {DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED},
                "queued or bounced copy to retry",
            )
        blobs = blob_store(settings, db)
        try:
            for copy in copies:
                await queue.check_kept(blobs, copy)
        finally:
            await blobs.close()
        async with db.transaction() as session:
            for copy in copies:
                await queue.retry_now(session, copy.id, utcnow(), lifetime)
        return copies

    for copy in _run(retry, config, Access.WRITE):
        click.echo(
            f"{copy.message_id}: {copy.recipient} will be retried now (a running relay picks it up)"
        )


@queue_group.command("delete")
@config_option
@click.argument("message_id")
@click.argument("recipients", nargs=-1)
def queue_delete(config: Path | None, message_id: str, recipients: tuple[str, ...]) -> None:
    """Drop a message's queued copies (only to RECIPIENTS if given) without a bounce."""

    async def remove(db: Database) -> list[Delivery]:
        async with db.transaction() as session:
            copies = _named(
                await queue.copies_of(session, message_id, recipients),
                message_id,
                recipients,
                {DeliveryStatus.QUEUED},
                "queued copy to delete",
            )
            for copy in copies:
                await queue.delete(session, copy.id, utcnow())
            return copies

    for copy in _run(remove, config, Access.WRITE):
        click.echo(f"{copy.message_id}: {copy.recipient} deleted")


def _named(
    copies: list[Delivery],
    message_id: str,
    recipients: tuple[str, ...],
    statuses: set[DeliveryStatus],
    wanted: str,
) -> list[Delivery]:
    """The copies to act on, or a QueueError saying why there are none."""
    if not copies:
        to = f" to {', '.join(recipients)}" if recipients else ""
        raise queue.QueueError(f"no message {message_id}{to} in the queue")
    chosen = [copy for copy in copies if copy.status in statuses]
    if not chosen:
        raise queue.QueueError(f"message {message_id} has no {wanted}")
    return chosen


@main.group("apikey")
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


@main.group("webhook")
def webhook_group() -> None:
    """Webhook endpoints: where the journal's events are posted (docs/webhooks.md)."""


def _desk_run(
    work: Callable[[WebhookDesk], Awaitable[T]], config: Path | None, access: Access
) -> T:
    async def run(db: Database) -> T:
        return await work(WebhookDesk(db))

    return _run(run, config, access)


def _moment(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 time") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=ZoneInfo("UTC"))


def _endpoint_line(endpoint: WebhookEndpoint) -> str:
    state = "enabled" if endpoint.enabled else f"disabled ({endpoint.disabled_reason or '-'})"
    flags = [f for f, on in (("thin", endpoint.thin), ("private", endpoint.allow_private)) if on]
    types = ",".join(endpoint.event_types) or "all events"
    extra = f"  [{' '.join(flags)}]" if flags else ""
    about = f"  {endpoint.description!r}" if endpoint.description else ""
    return f"{endpoint.id}  {endpoint.url}  {state}  {types}{extra}{about}"


@webhook_group.command("add")
@config_option
@click.argument("url")
@click.option(
    "--event", "events", multiple=True, help="An event type to post (repeat); all if none."
)
@click.option("--thin", is_flag=True, help="Ids only: no personal fields in payloads.")
@click.option("--allow-private", is_flag=True, help="May resolve to loopback or private addresses.")
@click.option("--description", default="", help="What the endpoint is for.")
def webhook_add(
    config: Path | None,
    url: str,
    events: tuple[str, ...],
    thin: bool,
    allow_private: bool,
    description: str,
) -> None:
    """Add an endpoint; prints its signing secret, this once."""

    async def add(desk: WebhookDesk) -> Created:
        return await desk.create(
            url,
            event_types=events,
            thin=thin,
            allow_private=allow_private,
            description=description,
        )

    created = _desk_run(add, config, Access.WRITE)
    click.echo(_endpoint_line(created.endpoint))
    click.echo(f"secret: {created.secret}  (shown once; the receiver verifies with it)")


@webhook_group.command("change")
@config_option
@click.argument("endpoint_id")
@click.option("--url", help="A new URL (checked again, as on add).")
@click.option(
    "--event", "events", multiple=True, help="The event types to post (repeat); replaces them."
)
@click.option("--all-events", is_flag=True, help="Post every event type from now on.")
@click.option("--thin/--full", default=None, help="Ids only, or full payloads.")
@click.option("--allow-private/--public-only", default=None, help="May reach private addresses.")
@click.option("--description", help="What the endpoint is for.")
def webhook_change(
    config: Path | None,
    endpoint_id: str,
    url: str | None,
    events: tuple[str, ...],
    all_events: bool,
    thin: bool | None,
    allow_private: bool | None,
    description: str | None,
) -> None:
    """Change an endpoint; what is not given stays as it is."""
    if events and all_events:
        raise click.UsageError("give either --event TYPE ... or --all-events")
    types: list[str] | None = list(events) if events else ([] if all_events else None)

    async def change(desk: WebhookDesk) -> WebhookEndpoint:
        return await desk.update(
            endpoint_id,
            url=url,
            event_types=types,
            description=description,
            thin=thin,
            allow_private=allow_private,
            by="cli",
        )

    click.echo(_endpoint_line(_desk_run(change, config, Access.WRITE)))


@webhook_group.command("list")
@config_option
def webhook_list(config: Path | None) -> None:
    """Every endpoint with its state and the events it receives."""
    endpoints = _desk_run(lambda desk: desk.list_endpoints(), config, Access.READ)
    if not endpoints:
        click.echo("no webhook endpoints")
    for endpoint in endpoints:
        click.echo(_endpoint_line(endpoint))


@webhook_group.command("disable")
@config_option
@click.argument("endpoint_id")
def webhook_disable(config: Path | None, endpoint_id: str) -> None:
    """Stop posting to an endpoint; its queued deliveries are given up."""
    endpoint = _desk_run(lambda desk: desk.disable(endpoint_id), config, Access.WRITE)
    click.echo(_endpoint_line(endpoint))


@webhook_group.command("enable")
@config_option
@click.argument("endpoint_id")
def webhook_enable(config: Path | None, endpoint_id: str) -> None:
    """Post to an endpoint again, from now on (`replay` sends what it missed)."""
    endpoint = _desk_run(lambda desk: desk.enable(endpoint_id), config, Access.WRITE)
    click.echo(_endpoint_line(endpoint))


@webhook_group.command("delete")
@config_option
@click.argument("endpoint_id")
def webhook_delete(config: Path | None, endpoint_id: str) -> None:
    """Delete an endpoint and its delivery history."""
    _desk_run(lambda desk: desk.delete(endpoint_id), config, Access.WRITE)
    click.echo(f"{endpoint_id} deleted")


@webhook_group.command("rotate-secret")
@config_option
@click.argument("endpoint_id")
def webhook_rotate(config: Path | None, endpoint_id: str) -> None:
    """A new signing secret; the old one keeps signing beside it for 24 hours."""
    secret = _desk_run(lambda desk: desk.rotate_secret(endpoint_id), config, Access.WRITE)
    click.echo(f"secret: {secret}  (shown once; the previous one signs too for 24 hours)")


@webhook_group.command("test")
@config_option
@click.argument("endpoint_id")
def webhook_test(config: Path | None, endpoint_id: str) -> None:
    """Post a `webhook.test` event to the endpoint (a running relay sends it)."""
    seq = _desk_run(lambda desk: desk.send_test(endpoint_id), config, Access.WRITE)
    click.echo(f"test event evt_{seq} queued for {endpoint_id}")


@webhook_group.command("deliveries")
@config_option
@click.argument("endpoint_id")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
def webhook_deliveries(config: Path | None, endpoint_id: str, limit: int) -> None:
    """The endpoint's recent deliveries, newest first."""
    rows: list[DeliveryView] = _desk_run(
        lambda desk: desk.deliveries(endpoint_id, limit), config, Access.READ
    )
    if not rows:
        click.echo("no deliveries yet")
    for d in rows:
        code = d.last_status_code if d.last_status_code is not None else "-"
        error = f"  {d.last_error}" if d.last_error else ""
        click.echo(
            f"evt_{d.event_seq}  {d.event_type}  {d.status}  attempts={d.attempts}  code={code}"
            f"  at={d.updated_at:%Y-%m-%d %H:%M:%S}Z{error}"
        )


@webhook_group.command("replay")
@config_option
@click.argument("endpoint_id")
@click.option("--event", "seq", type=int, help="The seq of one event to post again.")
@click.option("--since", help="Post again the events from this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="... up to this time (exclusive; default: now).")
def webhook_replay(
    config: Path | None, endpoint_id: str, seq: int | None, since: str | None, until: str | None
) -> None:
    """Post events again with their own webhook-id: one (--event) or a range (--since).

    A range takes every event of the endpoint's types, in order, leaving out those already
    queued for it; more than 10,000 is refused (replay shorter ranges one after another)."""
    if (seq is None) == (since is None):
        raise click.UsageError("give either --event SEQ or --since TIME [--until TIME]")
    start = _moment(since) if since else None
    end = _moment(until) if until else (utcnow() if since else None)
    count = _desk_run(
        lambda desk: desk.replay(endpoint_id, seq=seq, since=start, until=end),
        config,
        Access.WRITE,
    )
    click.echo(f"{count} event(s) queued again for {endpoint_id}")


@main.group("links")
def links_group() -> None:
    """Personal links and the files behind them."""


@links_group.command("expire")
@config_option
def links_expire(config: Path | None) -> None:
    """Expire links and letters past their date, delete blobs nobody needs (the hourly sweep)."""
    from gateway.letters.desk import LetterDesk
    from gateway.notices.desk import NoticeDesk
    from gateway.outbound.queue_signal import QueueSignal
    from sealrelay.serve import blob_store, sweeper_for

    settings = _settings(config)

    async def run(db: Database) -> sweeper.SweepReport:
        blobs = blob_store(settings, db)
        letters = LetterDesk(settings, db, blobs, QueueSignal().notify, utcnow)
        notices = NoticeDesk(settings, db, blobs, QueueSignal().notify, utcnow)
        try:
            return await sweeper_for(settings, db, blobs, letters, notices)(utcnow())
        finally:
            await blobs.close()

    report = _run(run, config, Access.WRITE)
    click.echo(
        f"{report.links_expired} link(s) expired, {report.letters_expired} letter(s) expired,"
        f" {report.blobs_deleted} blob(s) deleted ({report.bytes_freed / 1e6:.1f} MB freed)"
    )


@main.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys."""


@dkim_group.command("keygen")
@click.option("--domain", required=True, help="The sender domain the key signs for.")
@click.option("--selector", required=True, help="The DNS selector, e.g. 2026a.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the private key (default var/dkim/DOMAIN.SELECTOR.pem).",
)
def dkim_keygen(domain: str, selector: str, out: Path | None) -> None:
    """Write a new 2048-bit key and print its DNS record and config lines."""
    path = out or Path("var/dkim") / f"{domain}.{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = dkim.generate_private_key()
    try:
        dkim.write_private_key(key, path)
    except dkim.DkimError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"private key written to {path}\n")
    click.echo("Publish this DNS record:\n")
    click.echo(dkim.dns_txt_record(key, selector, domain))
    click.echo("\nand add to the config:\n")
    click.echo(f'[dkim."{domain}"]\nselector = "{selector}"\nkey_file = "{path}"')


@main.command()
@config_option
@click.option("--journal", "check_journal", is_flag=True, help="Check the journal's hash chain.")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def verify(config: Path | None, check_journal: bool, file: Path | None) -> None:
    """Check evidence: a released original FILE.eml, and/or the journal's hash chain.

    FILE.eml is checked offline against the configured DKIM key, the consent in the database
    and the journal. Exit status: 0 OK, 1 NOT OK, 2 the file cannot be read as a message.
    """
    if not check_journal and file is None:
        raise click.UsageError("say what to verify: FILE.eml, --journal, or both")
    raw = _read_message(file) if file is not None else None
    settings = _settings(config)

    async def check(
        db: Database,
    ) -> tuple[verification.VerificationReport | None, journal.ChainReport | None]:
        report = None
        if raw is not None:
            report = await verification.verify_released(db, settings, raw)
        chain = None
        if check_journal:
            chain = await journal.verify_database(db)
        return report, chain

    report, chain = _run(check, config)
    ok = True
    if report is not None:
        for line in report.lines():
            click.echo(line)
        ok = report.ok
    if chain is not None:
        if chain.ok:
            click.echo(f"journal OK: {chain.events} events, chain intact")
        else:
            click.echo(
                f"journal NOT OK: event {chain.broken_at} {chain.reason}"
                f" ({chain.events} events verified before it)"
            )
            ok = False
        if chain.lag.unchained:
            click.echo(_lag_line(chain.lag, datetime.now(UTC)))
    if not ok:
        sys.exit(1)


def _lag_line(lag: journal.Lag, now: datetime) -> str:
    """The events a sequencer has still to chain: `verify` proves nothing about them yet."""
    count = f"{lag.unchained} event{'s' if lag.unchained != 1 else ''}"
    oldest = f"{lag.oldest:%Y-%m-%d %H:%M:%S} UTC, " if lag.oldest else ""
    return (
        f"journal: {count} not chained yet, the oldest written {oldest}{lag.age(now):.0f} s"
        " ago (a running relay chains them within database.chain_interval)"
    )


def _read_message(file: Path) -> bytes:
    """The bytes of a saved message; exit 2 with one line when there is none to check."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        click.echo(f"cannot read {file}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    if raw.startswith(b"From "):  # an mbox separator line some clients save first
        raw = raw.partition(b"\n")[2]
    if not re.match(rb"[!-9;-~]+[ \t]*:", raw):
        click.echo(f"{file} is not a mail message: it does not start with a header field", err=True)
        sys.exit(2)
    return raw


@main.command()
@config_option
@click.argument("consent_id")
def evidence(config: Path | None, consent_id: str) -> None:
    """Show the stored record of a consent, its journal events and its PDF."""
    from sealrelay.serve import blob_store

    settings = _settings(config)

    async def look_up(db: Database) -> verification.ConsentEvidence | None:
        blobs = blob_store(settings, db)
        try:
            return await verification.consent_evidence(db, blobs, consent_id)
        finally:
            await blobs.close()

    found = _run(look_up, config)
    if found is None:
        raise click.ClickException(f"no consent with id {consent_id!r}")
    consent, letter, message = found.consent, found.letter, found.message
    zone = ZoneInfo(settings.branding.timezone)

    def moment(at: datetime) -> str:
        local = at.astimezone(zone)
        return f"{at:%Y-%m-%d %H:%M:%S} UTC ({local:%Y-%m-%d %H:%M:%S %Z}, {zone.key})"

    if found.recomputed_sha256 == consent.texts_sha256:
        texts_note = "the stored texts hash to it"
    elif found.recomputed_sha256 is None:
        texts_note = "THE STORED TEXTS ARE UNREADABLE"
    else:
        texts_note = f"THE STORED TEXTS HASH TO {found.recomputed_sha256}"
    rows: list[tuple[str, list[str]]] = [
        ("consent", [consent.id]),
        (
            "letter",
            [
                f"{letter.id} ({letter.status}, language {letter.language})"
                f" of message {letter.message_id}"
                if letter is not None
                else f"{consent.letter_id} (NOT FOUND)"
            ],
        ),
        ("recipient", [letter.recipient if letter is not None else "?"]),
        ("subject", [letter.subject if letter is not None else "?"]),
        ("agent", [message.sender if message is not None else "?"]),
        ("letter sent", [moment(consent.letter_sent_at)]),
        ("consent given", [moment(consent.given_at)]),
        ("IP address", [consent.ip]),
        ("user agent", [consent.user_agent]),
        ("texts", [f"sha256:{consent.texts_sha256} ({texts_note})"]),
        ("boxes", _boxes(consent.blocks, consent.checked) or ["(none to tick)"]),
        (
            "journal",
            [
                f"{verification.chain_number(event)} {event.at:%Y-%m-%d %H:%M:%S} UTC {event.type}"
                for event in found.events
            ]
            or ["(no events name this consent)"],
        ),
        *(
            (
                "PDF" if file.label == "consent PDF" else file.label,
                [_stored(file)],
            )
            for file in found.files
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, values in rows:
        for index, value in enumerate(values):
            click.echo(f"{label if index == 0 else '':<{width}}  {value}")
    missing = [file.label for file in found.files if not file.present]
    if missing:
        raise click.ClickException(
            f"evidence files missing from the blob store: {', '.join(missing)}"
        )


def _stored(file: verification.EvidenceFile) -> str:
    if file.location is None:
        return f"{file.digest!r} (NOT A BLOB NAME)"
    return f"{file.location}{'' if file.present else ' (MISSING from the blob store)'}"


def _boxes(blocks: list[dict[str, Any]], checked: list[str]) -> list[str]:
    lines = []
    for block in blocks:
        label = block.get("checkbox")
        if label is None:
            continue
        mark = "☒" if block.get("id") in checked else "☐"
        lines.append(f"{mark} {block.get('id')}: {' '.join(str(label).split())}")
    return lines
