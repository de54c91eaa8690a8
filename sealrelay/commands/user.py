"""`sealrelay user`: agents and admins, their aliases, upstream logins and TOTP."""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import click

from gateway import users
from gateway.agent_logins import AgentLogins, LoginKeyMissing, key_path
from gateway.config import NoticeSettings
from gateway.console import totp
from gateway.store.db import Database
from gateway.store.models import Role
from sealrelay.commands.common import Access, T, config_option, run, settings_for

_run = functools.partial(run, refused=(users.UserError,))


@click.group()
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
    known = {g.name for g in settings_for(config).groups}
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
    settings = settings_for(config)
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
    settings = settings_for(config)
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
    settings = settings_for(config)

    async def with_desk(db: Database) -> T:
        try:
            return await work(AgentLogins.from_settings(settings, db))
        except LoginKeyMissing as exc:
            raise click.ClickException(str(exc)) from exc

    return _run(with_desk, config, Access.WRITE)


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
    path = key_path(settings_for(config))
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
    issuer = settings_for(config).branding.company_name
    setup = _run(lambda db: totp.enable(db, email, issuer), config, Access.WRITE)
    click.echo(f"TOTP on for {email}; add it to an authenticator app (shown only now):")
    click.echo(f"uri: {setup.uri}")
    click.echo(f"secret: {setup.secret}")
