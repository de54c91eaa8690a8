"""API keys: made by an admin, shown once, kept only as a sha256, revocable.

A key is `sr_` and 32 random bytes in base64url. Looking a key up by its hash is the
constant-time comparison: the database finds the row by an index over digests, so how long
it takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import API_KEY_CREATED, API_KEY_REVOKED
from gateway.store.models import ApiKey, ApiKeyScope, new_id
from gateway.texts.refusals import Refused

PREFIX = "sr_"
DISPLAY_CHARS = 10  # "sr_" and seven characters: enough to tell keys apart, useless to guess
LAST_USED_EVERY = timedelta(minutes=1)


class ApiKeyError(Refused):
    """A request about keys that cannot be done; said to the person asking."""


class ApiKeyNotFound(ApiKeyError):
    pass


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    scope: ApiKeyScope
    prefix: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    info: KeyInfo
    key: str  # shown once


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.id,
        row.name,
        ApiKeyScope(row.scope),
        row.prefix,
        row.created_at,
        row.created_by,
        row.last_used_at,
        row.revoked_at,
    )


class ApiKeyDesk:
    def __init__(self, db: Database, clock: Callable[[], datetime]) -> None:
        self.db = db
        self.clock = clock

    async def create(self, name: str, scope: ApiKeyScope, by: str) -> NewKey:
        name = name.strip()
        if not name or len(name) > 200:
            raise ApiKeyError("key.name_length", maximum=200)
        key = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        now = self.clock()
        row = ApiKey(
            id=new_id(),
            name=name,
            prefix=key[:DISPLAY_CHARS],
            key_hash=_digest(key),
            scope=scope.value,
            created_at=now,
            created_by=by,
        )
        async with self.db.transaction() as session:
            session.add(row)
            await journal.append(
                session,
                [
                    API_KEY_CREATED.new(
                        {
                            "key_id": row.id,
                            "name": name,
                            "scope": scope.value,
                            "prefix": row.prefix,
                            "by": by,
                        }
                    )
                ],
                now,
            )
        return NewKey(_info(row), key)

    async def listing(self) -> list[KeyInfo]:
        async with self.db.transaction() as session:
            rows = (await session.scalars(select(ApiKey).order_by(ApiKey.created_at))).all()
        return [_info(row) for row in rows]

    async def revoke(self, key_id: str, by: str) -> KeyInfo:
        """Revoke a key; revoking a revoked key is refused, so the journal says it once."""
        now = self.clock()
        async with self.db.transaction() as session:
            row = await session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                raise ApiKeyNotFound("key.unknown", key=key_id)
            if row.revoked_at is not None:
                raise ApiKeyError("key.revoked", key=key_id)
            row.revoked_at = now
            await journal.append(
                session,
                [API_KEY_REVOKED.new({"key_id": row.id, "name": row.name, "by": by})],
                now,
            )
        return _info(row)

    async def authenticate(self, key: str) -> KeyInfo | None:
        """The key's details, or None for an unknown or revoked key.

        `last_used_at` is written at most once a minute per key, so a busy CRM does not turn
        every read into a write.
        """
        if not key.startswith(PREFIX) or len(key) > 100:
            return None
        digest = _digest(key)
        async with self.db.snapshot() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is None or row.revoked_at is not None:
            return None
        now = self.clock()
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
            async with self.db.transaction() as session:
                await session.execute(
                    update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now)
                )
            row.last_used_at = now
        return _info(row)
