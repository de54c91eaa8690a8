"""The `sealrelay` command: run the relay and administer users, queue, keys and journal."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import click

from gateway import dkim, journal, queue, sweeper, users, verification
from gateway.config import ConfigError, Settings, load_settings
from gateway.db import Database
from gateway.models import DeliveryStatus, utcnow

T = TypeVar("T")
DEMO_AGENT = "agent@demo.sealrelay.example"


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc


def _run(work: Callable[[Database], Awaitable[T]], config: Path | None) -> T:
    """Run one admin action against the configured database, migrating it first."""
    settings = _settings(config)

    async def main() -> T:
        db = Database.connect(settings.database.url)
        try:
            await db.upgrade()
            return await work(db)
        except (users.UserError, queue.QueueError) as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            await db.close()

    return asyncio.run(main())


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "-c",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar="SEALRELAY_CONFIG",
        help="TOML settings file (default: embedded defaults). Env: SEALRELAY_CONFIG.",
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
def serve(config: Path | None, roles: str) -> None:
    """Run the relay until SIGTERM or Ctrl-C."""
    from gateway.relay import Relay

    settings = _settings(config)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiosmtpd logs every command line at INFO, inline AUTH PLAIN credentials included.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    async def run() -> None:
        relay = Relay(settings, roles=[r.strip() for r in roles.split(",") if r.strip()])
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, relay.request_stop)
        try:
            await relay.serve_forever()
        finally:
            await relay.stop()

    try:
        asyncio.run(run())
    except (ValueError, RuntimeError, OSError, dkim.DkimError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("check-config")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check_config(file: Path) -> None:
    """Validate a settings file (and the environment on top of it)."""
    from gateway.relay import load_signer
    from gateway.smtp import tls_context

    settings = _settings(file)
    try:
        load_signer(settings)
    except dkim.DkimError as exc:
        raise click.ClickException(f"config error: dkim: {exc}") from exc
    try:
        tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        raise click.ClickException(f"config error: smtp.tls_cert/tls_key: {exc}") from exc
    click.echo(
        f"{file}: ok (smtp {', '.join(settings.smtp.listen)}; web {settings.web.listen};"
        f" upstream {settings.upstream.url}; dkim for {len(settings.dkim)} domain(s))"
    )


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config: Path | None) -> None:
    """Apply all migrations (serve does this at start too)."""

    async def noop(_: Database) -> None:
        return None

    _run(noop, config)
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
@click.option("--admin", is_flag=True, help="May use the admin console.")
@click.option("--group", default=None, help="The group whose settings apply to this agent.")
@click.option("--alias", "aliases", multiple=True, help="Another address the agent sends from.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(
    config: Path | None,
    email: str,
    admin: bool,
    group: str | None,
    aliases: tuple[str, ...],
    password_stdin: bool,
) -> None:
    """Create a user; prints a generated password unless one comes on stdin."""
    password, generated = _password(password_stdin)
    created = _run(
        lambda db: users.add_user(db, email, password, admin=admin, group=group, aliases=aliases),
        config,
    )
    click.echo(f"created {'admin' if admin else 'agent'} {created.email}")
    if generated:
        click.echo(f"password: {password}")


@user.command("list")
@config_option
def user_list(config: Path | None) -> None:
    """All users with their aliases."""
    for account, aliases in _run(users.list_users, config):
        flags = ["admin" if account.is_admin else "agent"]
        if account.disabled:
            flags.append("disabled")
        if account.group_name:
            flags.append(f"group={account.group_name}")
        alias_text = f"  aliases: {', '.join(aliases)}" if aliases else ""
        click.echo(f"{account.email}  [{' '.join(flags)}]{alias_text}")


@user.command("disable")
@config_option
@click.argument("email")
def user_disable(config: Path | None, email: str) -> None:
    """Stop a user from logging in (their queued mail still goes out)."""
    _run(lambda db: users.set_disabled(db, email, True), config)
    click.echo(f"disabled {email}")


@user.command("enable")
@config_option
@click.argument("email")
def user_enable(config: Path | None, email: str) -> None:
    """Let a disabled user log in again."""
    _run(lambda db: users.set_disabled(db, email, False), config)
    click.echo(f"enabled {email}")


@user.command("passwd")
@config_option
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_passwd(config: Path | None, email: str, password_stdin: bool) -> None:
    """Set a new password; prints a generated one unless one comes on stdin."""
    password, generated = _password(password_stdin)
    _run(lambda db: users.set_password(db, email, password), config)
    click.echo(f"password changed for {email}")
    if generated:
        click.echo(f"password: {password}")


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

    _run(ensure, config)
    click.echo(f"demo agent: {DEMO_AGENT}  password: {password}")


@main.group("queue")
def queue_group() -> None:
    """The outbound queue."""


@queue_group.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Include delivered, bounced, deleted.")
def queue_list(config: Path | None, show_all: bool) -> None:
    """Copies waiting for delivery, oldest first."""
    statuses = list(DeliveryStatus) if show_all else [DeliveryStatus.QUEUED]

    async def fetch(db: Database) -> list[queue.Claimed]:
        async with db.transaction() as session:
            return await queue.list_deliveries(session, statuses)

    rows = _run(fetch, config)
    if not rows:
        click.echo("the queue is empty")
    for row in rows:
        d, m = row.delivery, row.message
        error = f"  last error: {d.last_error}" if d.last_error else ""
        click.echo(
            f"{d.id}  {d.status:<9} {m.sender or '<>'} -> {d.recipient}  attempts={d.attempts}"
            f"  next={d.next_attempt_at:%Y-%m-%d %H:%M:%S}Z  {m.subject[:40]!r}{error}"
        )


@queue_group.command("retry")
@config_option
@click.argument("delivery_id")
def queue_retry(config: Path | None, delivery_id: str) -> None:
    """Try a queued (or bounced) copy again now."""
    lifetime = timedelta(seconds=_settings(config).upstream.queue_lifetime)

    async def retry(db: Database) -> None:
        async with db.transaction() as session:
            await queue.retry_now(session, delivery_id, utcnow(), lifetime)

    _run(retry, config)
    click.echo(f"{delivery_id} will be retried now (a running relay picks it up)")


@queue_group.command("delete")
@config_option
@click.argument("delivery_id")
def queue_delete(config: Path | None, delivery_id: str) -> None:
    """Drop a queued copy without sending a bounce."""

    async def remove(db: Database) -> None:
        async with db.transaction() as session:
            await queue.delete(session, delivery_id, utcnow())

    _run(remove, config)
    click.echo(f"{delivery_id} deleted")


@main.group("links")
def links_group() -> None:
    """Personal links and the files behind them."""


@links_group.command("expire")
@config_option
def links_expire(config: Path | None) -> None:
    """Mark links past their date expired and delete blobs nobody needs (as the hourly sweep)."""
    from gateway.blobstore import BlobStore

    settings = _settings(config)
    grace = timedelta(days=settings.storage.blob_grace_days)

    async def run(db: Database) -> sweeper.SweepReport:
        return await sweeper.sweep(db, BlobStore(settings.storage.path), utcnow(), grace)

    report = _run(run, config)
    click.echo(
        f"{report.links_expired} link(s) expired, {report.blobs_deleted} blob(s) deleted"
        f" ({report.bytes_freed / 1e6:.1f} MB freed)"
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
    if not ok:
        sys.exit(1)


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
    settings = _settings(config)
    found = _run(lambda db: verification.consent_evidence(db, settings, consent_id), config)
    if found is None:
        raise click.ClickException(f"no consent with id {consent_id!r}")
    consent, letter, message = found.consent, found.letter, found.message
    berlin = ZoneInfo("Europe/Berlin")

    def moment(at: datetime) -> str:
        return f"{at:%Y-%m-%d %H:%M:%S} UTC ({at.astimezone(berlin):%Y-%m-%d %H:%M:%S} Berlin)"

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
                f"#{event.seq} {event.at:%Y-%m-%d %H:%M:%S} UTC {event.type}"
                for event in found.events
            ]
            or ["(no events name this consent)"],
        ),
        (
            "PDF",
            [
                f"{found.pdf_path}{'' if found.pdf_path.exists() else ' (MISSING)'}"
                if found.pdf_path is not None
                else f"{consent.pdf_blob!r} (NOT A BLOB NAME)"
            ],
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, values in rows:
        for index, value in enumerate(values):
            click.echo(f"{label if index == 0 else '':<{width}}  {value}")


def _boxes(blocks: list[dict[str, Any]], checked: list[str]) -> list[str]:
    lines = []
    for block in blocks:
        label = block.get("checkbox")
        if label is None:
            continue
        mark = "☒" if block.get("id") in checked else "☐"
        lines.append(f"{mark} {block.get('id')}: {' '.join(str(label).split())}")
    return lines
