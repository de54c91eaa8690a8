"""Signing in to the web console: who is signed in, for how long, and signing out.

A session is a 256-bit random token in the browser's cookie; the `console_sessions` table
keeps only its sha256, so a copy of the database signs no one in. Every sign-in makes a fresh
token and deletes the session whose token the browser presented, so a token planted in a
browser before sign-in (session fixation) is never the one that gets signed in. A session
ends after `[console] idle_timeout` without a request and `absolute_timeout` after sign-in,
and at once when its user is disabled or deleted: every lookup reads the user too.

Passwords are the agent's SMTP credentials, checked by `gateway.users.authenticate` (argon2,
its login queue), and failures count in the `LoginThrottle` that SMTP AUTH shares, per client
address and per account. A user with a TOTP secret passes a second step: the password
yields a short-lived pending token, HMAC-signed with the installation key and bound to the
user's current password hash and secret, which only a right code turns into a session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NoReturn

from sqlalchemy import delete, func, select, update

from gateway import users
from gateway.access import Principal
from gateway.config import ConsoleSettings
from gateway.console import totp
from gateway.login_throttle import LoginThrottle
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import (
    CONSOLE_SIGN_IN_FAILED,
    CONSOLE_SIGNED_IN,
    CONSOLE_SIGNED_OUT,
    CONSOLE_SIGNED_OUT_EVERYWHERE,
)
from gateway.store.models import ConsoleSession, Role, User, utcnow

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
SEEN_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often
PENDING_FOR = timedelta(minutes=5)  # to type the TOTP code after the password
LOGIN_MAX = 320
USER_AGENT_MAX = 1000


def session_id(token: str) -> str:
    """What the table keeps of a token: its sha256."""
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()


class Refusal(StrEnum):
    WRONG = "wrong"  # login, password or code wrong; the visitor is not told which
    THROTTLED = "throttled"  # too many failures from this address or for this account
    EXPIRED = "expired"  # the pending second step ran out or no longer holds


class SignInRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


@dataclass(frozen=True)
class Client:
    """Where a request came from, as the web resolved it behind its trusted proxies."""

    ip: str
    user_agent: str


@dataclass(frozen=True)
class ConsoleUser:
    """A signed-in user and the session they are signed in with."""

    session_id: str
    user_id: int
    email: str
    role: Role
    group: str | None
    signed_in_at: datetime

    def principal(self) -> Principal:
        return Principal.for_user(self.user_id, self.email, self.role, self.group)


@dataclass(frozen=True)
class SignedIn:
    """A new session: `token` goes into the cookie and is never stored."""

    token: str
    user: ConsoleUser


@dataclass(frozen=True)
class CodeNeeded:
    """The password was right; `pending` and a TOTP code complete the sign-in."""

    pending: str


class SessionDesk:
    """Owns every write to `console_sessions` and every journal event of signing in and out."""

    def __init__(
        self,
        db: Database,
        settings: ConsoleSettings,
        throttle: LoginThrottle,
        key: bytes,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.idle = timedelta(seconds=settings.idle_timeout)
        self.absolute = timedelta(seconds=settings.absolute_timeout)
        self.throttle = throttle
        self._key = key
        self.clock = clock

    # -- signing in

    async def sign_in(
        self, login: str, password: str, client: Client, *, replacing: str | None = None
    ) -> SignedIn | CodeNeeded:
        """A session, or the second step when the user has TOTP; raises SignInRefused.

        `replacing` is the session token the browser already had: it is deleted, whatever
        happens next, so no token survives a sign-in.
        """
        login = login.strip()[:LOGIN_MAX]
        await self._forget(replacing)
        await self._wait_turn(client.ip, login)
        if self.throttle.refused(client.ip, login):
            log.warning("console sign-in from %s refused: too many failed logins", client.ip)
            raise SignInRefused(Refusal.THROTTLED)
        with self.throttle.checking(client.ip, login):
            agent = await users.authenticate(
                self.db, login, password, priority=self.throttle.priority(client.ip)
            )
        if agent is None:
            await self._failed(login, client, "password")
        async with self.db.transaction() as session:
            user = await session.get(User, agent.user_id)
        if user is None or user.disabled:
            await self._failed(login, client, "password")
        if user.totp_secret:
            return CodeNeeded(self._pending(user))
        self.throttle.succeeded(client.ip)
        return await self._open(user, client)

    async def confirm_code(
        self, pending: str, code: str, client: Client, *, replacing: str | None = None
    ) -> SignedIn:
        """The session for a pending sign-in and its TOTP code; raises SignInRefused."""
        await self._forget(replacing)
        user_id = self._pending_user(pending)
        if user_id is None:
            raise SignInRefused(Refusal.EXPIRED)
        async with self.db.transaction() as session:
            user = await session.get(User, user_id)
        if (
            user is None
            or user.disabled
            or not user.totp_secret
            or not hmac.compare_digest(pending, self._pending(user, pending_parts(pending)))
        ):
            raise SignInRefused(Refusal.EXPIRED)
        if self.throttle.refused(client.ip, user.email):
            raise SignInRefused(Refusal.THROTTLED)
        step = totp.matching_step(user.totp_secret, code, self.clock())
        if step is None or not await totp.spend(self.db, user.id, step):
            await self._failed(user.email, client, "code")
        self.throttle.succeeded(client.ip)
        return await self._open(user, client)

    async def _wait_turn(self, ip: str, login: str) -> None:
        """Parallel sign-ins wait for the checks before them (gateway/login_throttle.py); one
        that waits too long is refused as throttled."""
        try:
            await self.throttle.wait_turn(ip, login)
        except TimeoutError:
            log.warning("console sign-in from %s refused: waited too long for its turn", ip)
            raise SignInRefused(Refusal.THROTTLED) from None

    async def _failed(self, login: str, client: Client, reason: str) -> NoReturn:
        self.throttle.failed(client.ip, login)
        log.warning("console sign-in %r from %s failed (%s)", login[:100], client.ip, reason)
        async with self.db.transaction() as session:
            await journal.append(
                session,
                [CONSOLE_SIGN_IN_FAILED.new({"login": login, "ip": client.ip, "reason": reason})],
            )
        raise SignInRefused(Refusal.WRONG)

    async def _open(self, user: User, client: Client) -> SignedIn:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        row = ConsoleSession(
            id=session_id(token),
            user_id=user.id,
            created_at=now,
            last_seen_at=now,
            ip=client.ip[:45],
            user_agent=client.user_agent[:USER_AGENT_MAX],
        )
        async with self.db.transaction() as session:
            await session.execute(
                delete(ConsoleSession).where(
                    ConsoleSession.user_id == user.id,
                    (ConsoleSession.created_at <= now - self.absolute)
                    | (ConsoleSession.last_seen_at <= now - self.idle),
                )
            )
            session.add(row)
            await session.flush()
            await journal.append(
                session,
                [
                    CONSOLE_SIGNED_IN.new(
                        {
                            "email": user.email,
                            "ip": row.ip,
                            "user_agent": row.user_agent,
                        }
                    )
                ],
            )
        log.info("%s signed in to the console from %s", user.email, client.ip)
        return SignedIn(token, _console_user(row, user))

    async def _forget(self, token: str | None) -> None:
        if token:
            async with self.db.transaction() as session:
                await session.execute(
                    delete(ConsoleSession).where(ConsoleSession.id == session_id(token))
                )

    # -- the pending second step

    def _pending(self, user: User, parts: tuple[int, str] | None = None) -> str:
        """`user_id.expires.nonce.mac`, the mac over those and the user's credentials."""
        if parts is None:
            expires = int((self.clock() + PENDING_FOR).timestamp())
            nonce = secrets.token_urlsafe(16)
        else:
            expires, nonce = parts
        body = f"{user.id}.{expires}.{nonce}"
        bound = f"{body}|{user.password_hash}|{user.totp_secret}".encode()
        mac = hmac.new(self._key, b"console-pending|" + bound, hashlib.sha256).digest()
        return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    def _pending_user(self, pending: str) -> int | None:
        """The user a well-formed, unexpired pending token names; its mac is checked later."""
        fields = pending.split(".")
        if len(fields) != 4 or not fields[0].isdigit() or not fields[1].isdigit():
            return None
        if int(fields[1]) < self.clock().timestamp():
            return None
        return int(fields[0])

    # -- sessions

    async def current(self, token: str) -> ConsoleUser | None:
        """The user signed in with `token`, or None: unknown, ended, timed out, disabled."""
        if not token:
            return None
        sid = session_id(token)
        now = self.clock()
        async with self.db.transaction() as session:
            found = (
                await session.execute(
                    select(ConsoleSession, User)
                    .join(User, User.id == ConsoleSession.user_id)
                    .where(ConsoleSession.id == sid)
                )
            ).first()
            if found is None:
                return None
            row, user = found
            if (
                user.disabled
                or now - row.last_seen_at >= self.idle
                or now - row.created_at >= self.absolute
            ):
                await session.execute(delete(ConsoleSession).where(ConsoleSession.id == sid))
                return None
            if now - row.last_seen_at >= SEEN_EVERY:
                await session.execute(
                    update(ConsoleSession).where(ConsoleSession.id == sid).values(last_seen_at=now)
                )
            return _console_user(row, user)

    async def open_sessions(self, user: ConsoleUser) -> int:
        """How many sessions of this user have not timed out."""
        now = self.clock()
        async with self.db.transaction() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(ConsoleSession)
                .where(
                    ConsoleSession.user_id == user.user_id,
                    ConsoleSession.created_at > now - self.absolute,
                    ConsoleSession.last_seen_at > now - self.idle,
                )
            )
        return int(count or 0)

    async def change_password(
        self, user: ConsoleUser, current: str, new: str, client: Client
    ) -> None:
        """The signed-in user's own new password, given their current one.

        The current password is checked like a sign-in, in the same throttle, so a session
        left open on a shared computer is no way to guess it; a wrong one raises
        SignInRefused(WRONG) and counts as a failed login, too many raise THROTTLED before
        any check. Every other session of the user ends; this one stays.
        """
        await self._wait_turn(client.ip, user.email)
        if self.throttle.refused(client.ip, user.email):
            raise SignInRefused(Refusal.THROTTLED)
        with self.throttle.checking(client.ip, user.email):
            agent = await users.authenticate(
                self.db, user.email, current, priority=self.throttle.priority(client.ip)
            )
        if agent is None or agent.user_id != user.user_id:
            self.throttle.failed(client.ip, user.email)
            log.warning("console: wrong current password for %s from %s", user.email, client.ip)
            raise SignInRefused(Refusal.WRONG)
        await users.set_password(self.db, user.email, new, keep_session=user.session_id)
        log.info("%s changed their password", user.email)

    async def sign_out(self, user: ConsoleUser) -> None:
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(ConsoleSession).where(ConsoleSession.id == user.session_id)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                await journal.append(session, [CONSOLE_SIGNED_OUT.new({"email": user.email})])

    async def sign_out_everywhere(self, user: ConsoleUser) -> int:
        """Ends every session of the user, this one included; how many there were."""
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(ConsoleSession).where(ConsoleSession.user_id == user.user_id)
            )
            ended = int(result.rowcount or 0)  # type: ignore[attr-defined]
            await journal.append(
                session,
                [CONSOLE_SIGNED_OUT_EVERYWHERE.new({"email": user.email, "sessions": ended})],
            )
        log.info("%s signed out everywhere (%d sessions)", user.email, ended)
        return ended


async def delete_timed_out(db: Database, settings: ConsoleSettings, now: datetime) -> int:
    """Deletes every session past its idle or absolute timeout (with its IP address and
    browser): the hourly sweep's share for the console. How many there were."""
    idle = timedelta(seconds=settings.idle_timeout)
    absolute = timedelta(seconds=settings.absolute_timeout)
    async with db.transaction() as session:
        result = await session.execute(
            delete(ConsoleSession).where(
                (ConsoleSession.created_at <= now - absolute)
                | (ConsoleSession.last_seen_at <= now - idle)
            )
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def pending_parts(pending: str) -> tuple[int, str]:
    fields = pending.split(".")
    return int(fields[1]), fields[2]


def _console_user(row: ConsoleSession, user: User) -> ConsoleUser:
    return ConsoleUser(
        session_id=row.id,
        user_id=user.id,
        email=user.email,
        role=Role(user.role),
        group=user.group_name,
        signed_in_at=row.created_at,
    )
