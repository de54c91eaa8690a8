"""Agents' own upstream logins, for mail hosts that refuse a From address of another account.

The password is sealed with AES-GCM under a key kept in a file outside the database
(`[secrets] key_file`), with the user id as associated data: a database copy alone reveals
nothing, and a sealed password moved to another user's row does not open. The key file is
created (32 random bytes, mode 0600) the first time a login is set; once rows exist, a missing
key is an error that names the file, never a new key that would silently orphan them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.key_files import place_key
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import (
    USER_UPSTREAM_LOGIN_CLEARED,
    USER_UPSTREAM_LOGIN_SET,
    UserUpstreamLogin,
)
from gateway.store.models import AgentLogin, User, utcnow
from gateway.users import UnknownUser, UserError, normalize_address

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = b"\x01"  # the first byte of every sealed value: which scheme sealed it
DEFAULT_KEY_FILE = "agent-logins.key"
MAX_PASSWORD = 1000


class LoginKeyMissing(Exception):
    """Logins are stored but the key that opens them is gone; the text names the file."""


class LoginUnreadable(Exception):
    """A stored login does not open with this key for this user (the wrong key, a row
    copied from another user, damage). The text never holds any part of the secret."""


@dataclass(frozen=True)
class LoginView:
    """What may be shown about a login: everything but the password."""

    email: str
    url: str
    username: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class OpenLogin:
    """A login ready to send with; `password` is left out of repr so it never reaches a log."""

    user_id: int
    url: str
    username: str
    updated_at: datetime
    password: str = field(repr=False)


def key_path(settings: Settings) -> Path:
    return settings.secrets.key_file or settings.storage.path.parent / DEFAULT_KEY_FILE


def check_url(url: str) -> str:
    """smtp://HOST[:PORT] or smtps://HOST[:PORT]; credentials in it are refused, since a URL
    is shown and logged and the password has a sealed place of its own."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise UserError("login.bad_port") from exc
    if parts.scheme not in {"smtp", "smtps"} or not parts.hostname:
        raise UserError("login.not_smtp")
    if parts.username is not None or parts.password is not None:
        raise UserError("login.credentials_in_url")
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise UserError("login.not_smtp")
    return f"{parts.scheme}://{parts.netloc}"


class SecretBox:
    """AES-GCM with one key; each value gets a fresh nonce and is bound to its user id."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a login key must have exactly {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key>)"

    @staticmethod
    def _bound_to(user_id: int) -> bytes:
        return f"sealrelay agent login for user {user_id}".encode()

    def seal(self, user_id: int, secret: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), self._bound_to(user_id))
        return VERSION + nonce + sealed

    def open(self, user_id: int, sealed: bytes) -> str:
        if sealed[:1] != VERSION or len(sealed) < 1 + NONCE_BYTES + 16:
            raise LoginUnreadable(f"the stored login of user {user_id} is not in a known form")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, self._bound_to(user_id)).decode()
        except InvalidTag:
            raise LoginUnreadable(
                f"the stored login of user {user_id} does not open with this key"
                " (another key, or a row copied from another user): set it again"
            ) from None


def read_key(path: Path) -> bytes | None:
    """The key at `path`, None when there is no file; a file of the wrong size is an error."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(key) != KEY_BYTES:
        raise LoginKeyMissing(f"{path}: a login key must have exactly {KEY_BYTES} bytes")
    return key


def create_key(path: Path) -> bytes:
    """32 random bytes at `path` (gateway/key_files.py); another process's key when it was
    first."""
    return place_key(path, secrets.token_bytes(KEY_BYTES))


class AgentLogins:
    """Set, clear, show and open agents' upstream logins."""

    def __init__(
        self, db: Database, key_file: Path, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.db = db
        self.key_file = key_file
        self.clock = clock
        self._box: SecretBox | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, db: Database, clock: Callable[[], datetime] = utcnow
    ) -> AgentLogins:
        return cls(db, key_path(settings), clock)

    async def _open_box(self, *, create: bool) -> SecretBox:
        if self._box is not None:
            return self._box
        key = read_key(self.key_file)
        if key is None:
            stored = await self.count()
            if stored or not create:
                raise LoginKeyMissing(
                    f"the key file {self.key_file} ([secrets] key_file) is missing, and"
                    f" {stored} agents' upstream logins are sealed with it: restore it from"
                    " the backup, or clear those logins and set them again"
                )
            key = create_key(self.key_file)
        self._box = SecretBox(key)
        return self._box

    async def count(self) -> int:
        async with self.db.transaction() as session:
            return await session.scalar(select(func.count()).select_from(AgentLogin)) or 0

    async def key_problem(self) -> str | None:
        """Why stored logins cannot be opened, for start-up; None when all is well."""
        if not await self.count():
            return None
        try:
            await self._open_box(create=False)
        except LoginKeyMissing as exc:
            return str(exc)
        return None

    async def set(self, email: str, url: str, username: str, password: str, *, by: str) -> None:
        email = normalize_address(email)
        url = check_url(url)
        username = username.strip()
        if not username or len(username) > 320:
            raise UserError("login.username_length", maximum=320)
        if not password or len(password) > MAX_PASSWORD:
            raise UserError("login.password_length", maximum=MAX_PASSWORD)
        box = await self._open_box(create=True)
        now = self.clock()
        async with self.db.transaction() as session:
            user = await _live_user(session, email)
            row = await session.get(AgentLogin, user.id, with_for_update=True)
            sealed = box.seal(user.id, password)
            if row is None:
                session.add(
                    AgentLogin(
                        user_id=user.id,
                        url=url,
                        username=username,
                        ciphertext=sealed,
                        created_at=now,
                        updated_at=now,
                    )
                )
            else:
                row.url, row.username, row.ciphertext, row.updated_at = url, username, sealed, now
            event = UserUpstreamLogin(email=email, url=url, username=username, by=by)
            await journal.append(session, [USER_UPSTREAM_LOGIN_SET.new(event)], now)

    async def clear(self, email: str, *, by: str) -> bool:
        """Remove the login; False when the user had none."""
        email = normalize_address(email)
        async with self.db.transaction() as session:
            user = await _live_user(session, email)
            row = await session.get(AgentLogin, user.id, with_for_update=True)
            if row is None:
                return False
            event = UserUpstreamLogin(email=email, url=row.url, username=row.username, by=by)
            await session.execute(delete(AgentLogin).where(AgentLogin.user_id == user.id))
            await journal.append(session, [USER_UPSTREAM_LOGIN_CLEARED.new(event)], self.clock())
            return True

    async def show(self, email: str) -> LoginView | None:
        email = normalize_address(email)
        async with self.db.transaction() as session:
            user = await _live_user(session, email)
            row = await session.get(AgentLogin, user.id)
            if row is None:
                return None
            return LoginView(email, row.url, row.username, row.created_at, row.updated_at)

    async def views(self) -> dict[str, LoginView]:
        """Every live user's login by address, for the admin's users page."""
        async with self.db.transaction() as session:
            rows = await session.execute(
                select(User.email, AgentLogin)
                .join(AgentLogin, AgentLogin.user_id == User.id)
                .where(User.deleted_at.is_(None))
            )
            return {
                email: LoginView(email, row.url, row.username, row.created_at, row.updated_at)
                for email, row in rows.all()
            }

    async def updated_at(self, user_id: int) -> datetime | None:
        """When the user's login last changed, None without one: a cheap look for caches."""
        async with self.db.transaction() as session:
            return await session.scalar(
                select(AgentLogin.updated_at).where(AgentLogin.user_id == user_id)
            )

    async def open(self, user_id: int) -> OpenLogin | None:
        """The user's login with its password, None without one. LoginKeyMissing or
        LoginUnreadable when it cannot be opened."""
        async with self.db.transaction() as session:
            row = await session.get(AgentLogin, user_id)
        if row is None:
            return None
        box = await self._open_box(create=False)
        try:
            password = box.open(user_id, row.ciphertext)
        except LoginUnreadable:
            # the key may have been rotated by `rotate-key` since this process read it
            self._box = None
            password = (await self._open_box(create=False)).open(user_id, row.ciphertext)
        return OpenLogin(user_id, row.url, row.username, row.updated_at, password)

    async def rotate_key(self) -> int:
        """Seal every login with a new key; returns how many. The new key is written beside
        the old one first (`.new`), the rows are re-sealed in one transaction, then the new
        key takes the old one's place and the old one is kept as `.old`. Run it again after
        an interruption: rows already sealed with the pending key are taken as they are."""
        old = await self._open_box(create=False)
        pending_path = self.key_file.with_name(self.key_file.name + ".new")
        pending = SecretBox(read_key(pending_path) or create_key(pending_path))
        async with self.db.transaction() as session:
            rows = (await session.scalars(select(AgentLogin).with_for_update())).all()
            for row in rows:
                try:
                    secret = old.open(row.user_id, row.ciphertext)
                except LoginUnreadable:
                    secret = pending.open(row.user_id, row.ciphertext)
                row.ciphertext = pending.seal(row.user_id, secret)
        kept = self.key_file.with_name(self.key_file.name + ".old")
        kept.unlink(missing_ok=True)
        os.link(self.key_file, kept)
        os.replace(pending_path, self.key_file)
        self._box = None
        return len(rows)


async def _live_user(session: AsyncSession, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == email, User.deleted_at.is_(None)))
    if user is None:
        raise UnknownUser("user.unknown", email=email)
    return user
