"""Agents and admins: who may log in, and which addresses each may send from.

A deleted user keeps their row, marked `deleted_at`: messages point at it (`messages.user_id`)
and the journal names their address, so removing the row would either fail on the foreign
key or leave the broker's evidence without its sender. Everything else about them ends (see
`delete_user`), and every lookup here treats them as unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import secrets
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import NoticeSettings, Settings
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import (
    USER_ALIAS_ADDED,
    USER_ALIAS_REMOVED,
    USER_CHANGED,
    USER_CREATED,
    USER_DELETED,
    USER_DISABLED,
    USER_ENABLED,
    USER_NOTICES_CHANGED,
    USER_PASSWORD_CHANGED,
    USER_PASSWORD_RESET,
)
from gateway.store.metrics import AUTH_CHECKS_WAITING
from gateway.store.models import AgentLogin, Alias, ConsoleSession, Role, User, utcnow
from gateway.texts.refusals import Refused
from rules.domains import domain_of

# OWASP's argon2id minimum (19 MiB, 2 passes, 1 lane): the library default takes 64 MiB per
# check, which a relay doing SMTP AUTH all day pays in resident memory. Stored hashes carry
# their own parameters, so older ones still verify.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Each argon2 verification takes ~19 MiB and tens of ms: two threads keep memory bounded and
# the event loop free.
ARGON2_THREADS = 2
_argon2_pool = ThreadPoolExecutor(max_workers=ARGON2_THREADS, thread_name_prefix="argon2")


class _LoginQueue:
    """At most ARGON2_THREADS logins checked at once; the waiting ones go lowest priority first.

    First come, first served, 200 parallel guessers made an agent's login wait behind all
    of theirs (9-15 s instead of 0.06 s): for the hasher, and before it for the database
    (SQLite has one connection). The SMTP front passes the recent failed logins of the
    client's address as the priority, so an address with a clean record goes ahead of
    every guesser.
    """

    def __init__(self) -> None:
        self._free = ARGON2_THREADS
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def turn(self, priority: float) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), turn))
        AUTH_CHECKS_WAITING.inc()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # given the turn, then cancelled: pass it on
            raise
        finally:
            AUTH_CHECKS_WAITING.dec()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


_queues: WeakKeyDictionary[asyncio.AbstractEventLoop, _LoginQueue] = WeakKeyDictionary()


def _login_queue() -> _LoginQueue:
    loop = asyncio.get_running_loop()
    queue = _queues.get(loop)
    if queue is None:
        queue = _queues[loop] = _LoginQueue()
    return queue


class UserError(Refused):
    """A request about users that cannot be done; said to the person asking."""


class UnknownUser(UserError):
    """No such user, or one who was deleted."""


class UserConflict(UserError):
    """The request is well formed but the users as they are forbid it (the last admin, one's
    own account, an address in use)."""


MAX_ALIASES = 50
MIN_PASSWORD = 10
DELETED_PASSWORD = "!deleted"  # noqa: S105 (not an argon2 hash: no password verifies)


@dataclass(frozen=True)
class Agent:
    """An authenticated sender: what the pipeline needs to know about who is sending."""

    user_id: int
    email: str
    group: str | None
    role: Role
    addresses: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    def may_send_as(self, address: str) -> bool:
        return address.lower() in self.addresses or lookup_form(address) in self.addresses


def normalize_address(address: str) -> str:
    """Validated, lower-cased; raises UserError with the validator's sentence."""
    try:
        valid = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise UserError("user.not_an_address", address=address, reason=str(exc)) from exc
    return valid.normalized.lower()


def lookup_form(address: str) -> str:
    """A login or sender address as addresses are stored (`normalize_address`: the domain in
    its Unicode form), so that `anna@xn--mller-kva.de` finds `anna@müller.de`; lower-cased
    as it is when it is no valid address. Plain ASCII needs no validator."""
    text = address.strip().lower()
    if text.isascii() and "xn--" not in text:
        return text
    try:
        return normalize_address(text)
    except UserError:
        return text


def generate_password() -> str:
    """20 characters of base64url. Never a leading "-": pasted after `--auth-password` (swaks,
    as the README shows) or any option, it would be read as an option of its own."""
    while (password := secrets.token_urlsafe(15)).startswith("-"):
        pass  # one in 64 draws
    return password


async def add_user(
    db: Database,
    email: str,
    password: str,
    *,
    role: Role = Role.AGENT,
    group: str | None = None,
    aliases: tuple[str, ...] = (),
) -> User:
    email = normalize_address(email)
    alias_addresses = sorted({normalize_address(a) for a in aliases} - {email})
    if len(password) < MIN_PASSWORD:
        raise UserError("user.password_short", minimum=MIN_PASSWORD)
    password_hash = await asyncio.to_thread(_hasher.hash, password)
    user = User(email=email, password_hash=password_hash, role=role, group_name=group)
    try:
        async with db.transaction() as session:
            taken = await session.scalar(select(Alias).where(Alias.address == email))
            if taken is not None:
                raise UserConflict("user.alias_of_another", email=email)
            gone = await session.scalar(
                select(User.id).where(User.email == email, User.deleted_at.is_not(None))
            )
            if gone is not None:
                raise UserConflict("user.reserved", email=email)
            session.add(user)
            await session.flush()
            session.add_all(Alias(address=a, user_id=user.id) for a in alias_addresses)
            await journal.append(
                session,
                [
                    USER_CREATED.new(
                        {"email": email, "admin": role == Role.ADMIN, "role": role.value}
                    )
                ],
            )
    except IntegrityError as exc:
        raise UserConflict("user.taken", email=email) from exc
    return user


async def list_users(db: Database) -> list[tuple[User, list[str]]]:
    async with db.transaction() as session:
        users = (
            await session.scalars(
                select(User).where(User.deleted_at.is_(None)).order_by(User.email)
            )
        ).all()
        aliases = (await session.scalars(select(Alias))).all()
    by_user: dict[int, list[str]] = {}
    for alias in aliases:
        by_user.setdefault(alias.user_id, []).append(alias.address)
    return [(user, sorted(by_user.get(user.id, []))) for user in users]


async def _live(session: AsyncSession, email: str, *, lock: bool = False) -> User:
    """The user with this address; UnknownUser when there is none or they were deleted."""
    query = select(User).where(User.email == email, User.deleted_at.is_(None))
    user = await session.scalar(query.with_for_update() if lock else query)
    if user is None:
        raise UnknownUser("user.unknown", email=email)
    return user


async def _keep_an_admin(session: AsyncSession, user: User) -> None:
    """Refuses to take away the last enabled admin: without one nobody can manage users,
    and only the CLI on the server could repair it. The other admins' rows are locked, so
    two admins demoting each other at once cannot both succeed (PostgreSQL; SQLite has one
    writer anyway)."""
    if user.role != Role.ADMIN or user.disabled:
        return
    others = (
        await session.scalars(
            select(User.id)
            .where(
                User.role == Role.ADMIN,
                User.disabled.is_(False),
                User.deleted_at.is_(None),
                User.id != user.id,
            )
            .with_for_update()
        )
    ).all()
    if not others:
        raise UserConflict("user.last_admin", email=user.email)


async def _end_sessions(session: AsyncSession, user_id: int, keep: str | None = None) -> int:
    query = delete(ConsoleSession).where(ConsoleSession.user_id == user_id)
    if keep is not None:
        query = query.where(ConsoleSession.id != keep)
    result = await session.execute(query)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def find_user(db: Database, email: str) -> tuple[User, list[str]]:
    """The user with their aliases; UnknownUser when there is none or they were deleted."""
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await _live(session, email)
        return user, await _aliases(session, user.id)


async def set_disabled(db: Database, email: str, disabled: bool = True) -> None:
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        if disabled:
            await _keep_an_admin(session, user)
        user.disabled = disabled
        if disabled:  # signed out of the console at once, on every device
            await session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
        await journal.append(
            session,
            [(USER_DISABLED if disabled else USER_ENABLED).new({"email": email})],
        )


@dataclass(frozen=True)
class NoticePrefs:
    """Which optional mails an agent gets (gateway/notices/). The consent confirmation is
    not a preference: it is the broker's evidence of the consent and always goes."""

    first_download: bool
    expiry_warning: bool

    @classmethod
    def of(cls, stored: Mapping[str, object], defaults: NoticeSettings) -> NoticePrefs:
        """The effective choice: what the agent stored, else the installation's default."""
        return cls(
            first_download=_choice(stored, "first_download", defaults.first_download),
            expiry_warning=_choice(stored, "expiry_warning", defaults.expiry_warning),
        )


NOTICE_KINDS = tuple(NoticePrefs.__dataclass_fields__)


def _choice(stored: Mapping[str, object], key: str, default: bool) -> bool:
    value = stored.get(key)
    return value if isinstance(value, bool) else default


async def notifications(db: Database, email: str, settings: Settings) -> NoticePrefs:
    """The agent's effective notice preferences (theirs, else their group's, else
    `[notices]`)."""
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await _live(session, email)
    return NoticePrefs.of(user.notify, settings.notices_for(user.group_name))


async def set_notifications(
    db: Database, email: str, changes: Mapping[str, bool], settings: Settings
) -> NoticePrefs:
    """Store the agent's choices (only the kinds named in `changes`; the rest stay) and
    return the effective preferences; a change is journaled (`user.notices_changed`). An
    unknown kind is refused, nothing is written."""
    unknown = sorted(set(changes) - set(NOTICE_KINDS))
    if unknown:
        raise UserError("user.unknown_notices", kinds=", ".join(unknown))
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        defaults = settings.notices_for(user.group_name)
        before = NoticePrefs.of(user.notify, defaults)
        user.notify = {**(user.notify or {}), **{k: bool(v) for k, v in changes.items()}}
        after = NoticePrefs.of(user.notify, defaults)
        if after != before:
            await journal.append(
                session,
                [
                    USER_NOTICES_CHANGED.new(
                        {
                            "email": email,
                            "first_download": after.first_download,
                            "expiry_warning": after.expiry_warning,
                        }
                    )
                ],
            )
    return after


KEEP = object()  # `change_user`: leave the group as it is


async def change_user(
    db: Database,
    email: str,
    *,
    role: Role | None = None,
    group: str | object | None = KEEP,
    disabled: bool | None = None,
) -> tuple[User, list[str]]:
    """Change a user's role, group or whether they are disabled, in one transaction; each
    change that changes something is journaled. Returns the user with their aliases. The
    last enabled admin is neither demoted nor disabled (UserConflict)."""
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        if (role is not None and role != Role.ADMIN) or disabled:
            await _keep_an_admin(session, user)
        changes = []
        new_group = user.group_name if group is KEEP else group
        assert new_group is None or isinstance(new_group, str)
        if (role is not None and role != user.role) or new_group != user.group_name:
            user.role = role or user.role
            user.group_name = new_group
            changes.append(
                USER_CHANGED.new({"email": email, "role": user.role, "group": user.group_name})
            )
        if disabled is not None and disabled != user.disabled:
            user.disabled = disabled
            if disabled:  # signed out of the console at once, on every device
                await _end_sessions(session, user.id)
            changes.append((USER_DISABLED if disabled else USER_ENABLED).new({"email": email}))
        await journal.append(session, changes)
        aliases = (
            await session.scalars(select(Alias.address).where(Alias.user_id == user.id))
        ).all()
    return user, sorted(aliases)


async def set_password(
    db: Database, email: str, password: str, *, keep_session: str | None = None
) -> None:
    """A new password; every console session of the user ends but `keep_session` (the one
    a user changing their own password is signed in with), since a password is changed
    because someone else may know the old one."""
    email = normalize_address(email)
    password_hash = await _hash_new(password)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        user.password_hash = password_hash
        await _end_sessions(session, user.id, keep_session)
        await journal.append(session, [USER_PASSWORD_CHANGED.new({"email": email})])


async def _hash_new(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError("user.password_short", minimum=MIN_PASSWORD)
    return await asyncio.to_thread(_hasher.hash, password)


async def reset_password(db: Database, email: str, *, by: str) -> str:
    """An admin's reset: a generated password, returned to be shown once and never stored
    or journaled in clear; the user's console sessions end, their mail programs need the
    new password."""
    email = normalize_address(email)
    password = generate_password()
    password_hash = await _hash_new(password)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        user.password_hash = password_hash
        ended = await _end_sessions(session, user.id)
        await journal.append(
            session, [USER_PASSWORD_RESET.new({"email": email, "sessions": ended, "by": by})]
        )
    return password


async def delete_user(db: Database, email: str, *, by: str) -> None:
    """Delete a user as far as the evidence allows.

    The row stays, marked deleted and disabled, because `messages.user_id` points at it and
    the journal names the address: the broker must still show who sent an offer and what
    happened to it, so the address stays reserved (re-adding it is refused). Everything that
    let the person act ends in the same transaction: the password (replaced by a value no
    password matches), the TOTP secret, every console session, the optional notice mails,
    their own upstream login (its sealed password is not kept), and the aliases, which are
    free for another user. Their team lead still sees their
    messages (the group stays). Refused for one's own account (`by` is the actor's address)
    and for the last enabled admin.
    """
    email = normalize_address(email)
    if by.strip().lower() == email:
        raise UserConflict("user.own_account")
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        await _keep_an_admin(session, user)
        aliases = sorted(
            (await session.scalars(select(Alias.address).where(Alias.user_id == user.id))).all()
        )
        await session.execute(delete(Alias).where(Alias.user_id == user.id))
        await session.execute(delete(AgentLogin).where(AgentLogin.user_id == user.id))
        ended = await _end_sessions(session, user.id)
        user.deleted_at = utcnow()
        user.disabled = True
        user.password_hash = DELETED_PASSWORD
        user.totp_secret = None
        user.notify = {kind: False for kind in NOTICE_KINDS}
        await journal.append(
            session,
            [USER_DELETED.new({"email": email, "aliases": aliases, "sessions": ended, "by": by})],
        )


async def add_alias(db: Database, email: str, address: str, *, by: str) -> list[str]:
    """Let the user also send as `address`; returns their aliases. An address that is a
    user's login or another alias is refused (UserConflict)."""
    email = normalize_address(email)
    alias = normalize_address(address)
    try:
        async with db.transaction() as session:
            user = await _live(session, email, lock=True)
            if await session.scalar(select(User.id).where(User.email == alias)) is not None:
                raise UserConflict("user.login_address", alias=alias)
            owner = await session.scalar(select(Alias.user_id).where(Alias.address == alias))
            if owner is not None:
                raise UserConflict("user.alias_taken", alias=alias)
            count = await session.scalar(
                select(func.count()).select_from(Alias).where(Alias.user_id == user.id)
            )
            if (count or 0) >= MAX_ALIASES:
                raise UserConflict("user.too_many_aliases", email=email, maximum=MAX_ALIASES)
            session.add(Alias(address=alias, user_id=user.id))
            await session.flush()
            await journal.append(
                session, [USER_ALIAS_ADDED.new({"email": email, "alias": alias, "by": by})]
            )
            return await _aliases(session, user.id)
    except IntegrityError as exc:  # the same address added twice at once
        raise UserConflict("user.alias_taken", alias=alias) from exc


async def remove_alias(db: Database, email: str, address: str, *, by: str) -> list[str]:
    """The user may no longer send as `address`; returns their aliases. UnknownUser when the
    address is not one of this user's aliases."""
    email = normalize_address(email)
    alias = normalize_address(address)
    async with db.transaction() as session:
        user = await _live(session, email, lock=True)
        result = await session.execute(
            delete(Alias).where(Alias.user_id == user.id, Alias.address == alias)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise UnknownUser("user.not_an_alias", alias=alias, email=email)
        await journal.append(
            session, [USER_ALIAS_REMOVED.new({"email": email, "alias": alias, "by": by})]
        )
        return await _aliases(session, user.id)


async def _aliases(session: AsyncSession, user_id: int) -> list[str]:
    return sorted(
        (await session.scalars(select(Alias.address).where(Alias.user_id == user_id))).all()
    )


async def authenticate(
    db: Database, login: str, password: str, *, priority: float = 0.0
) -> Agent | None:
    """The agent for these credentials, or None; disabled users never authenticate.

    Checks with a lower `priority` go first when several wait for their turn.
    """
    login = lookup_form(login)
    async with _login_queue().turn(priority):
        async with db.transaction() as session:
            user = await session.scalar(select(User).where(User.email == login))
            aliases = (
                (await session.scalars(select(Alias.address).where(Alias.user_id == user.id))).all()
                if user is not None
                else []
            )
        stored = user.password_hash if user is not None else _dummy_hash()
        loop = asyncio.get_running_loop()
        matches = await loop.run_in_executor(_argon2_pool, _verify, stored, password)
    if user is None or user.disabled or not matches:
        return None
    return Agent(
        user_id=user.id,
        email=user.email,
        group=user.group_name,
        role=Role(user.role),
        addresses=frozenset([user.email, *aliases]),
    )


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the login is unknown, so timing does not reveal which exist."""
    return _hasher.hash(secrets.token_urlsafe(16))


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def agent_by_address(db: Database, address: str) -> Agent | None:
    """The enabled agent whose address or alias `address` is, for a trusted client's mail
    (gateway/fronts/trusted.py); None when nobody has it."""
    address = lookup_form(address)
    async with db.transaction() as session:
        user = await session.scalar(select(User).where(User.email == address))
        if user is None:
            owner = await session.scalar(select(Alias.user_id).where(Alias.address == address))
            user = await session.get(User, owner) if owner is not None else None
        if user is None or user.disabled:
            return None
        aliases = (
            await session.scalars(select(Alias.address).where(Alias.user_id == user.id))
        ).all()
    return Agent(
        user_id=user.id,
        email=user.email,
        group=user.group_name,
        role=Role(user.role),
        addresses=frozenset([user.email, *aliases]),
    )


async def address_domains(db: Database) -> frozenset[str]:
    """The domains of every user's address and alias, by their keys (rules/domains.py): part
    of "the domains we serve"."""
    async with db.transaction() as session:
        emails = (await session.scalars(select(User.email))).all()
        aliases = (await session.scalars(select(Alias.address))).all()
    return frozenset(domain_of(a) for a in (*emails, *aliases))
