"""The key desk: shown once, kept as a hash, revocable, last use written at most once a minute."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from gateway.console.api_keys import ApiKeyDesk, ApiKeyError, ApiKeyNotFound
from gateway.store.db import Database
from gateway.store.models import ApiKey, ApiKeyScope, Event


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_key_is_kept_as_a_hash_and_revoked_for_good(database: Database) -> None:
    clock = Clock()
    desk = ApiKeyDesk(database, clock)
    made = await desk.create("  CRM Nord ", ApiKeyScope.WRITE, "admin@broker.example")
    assert made.key.startswith("sr_") and made.info.name == "CRM Nord"
    assert made.key.startswith(made.info.prefix) and len(made.info.prefix) < 12
    async with database.transaction() as session:
        row = (await session.scalars(select(ApiKey))).one()
        types = (await session.scalars(select(Event.type).order_by(Event.id))).all()
    assert row.key_hash == hashlib.sha256(made.key.encode()).hexdigest()
    assert made.key not in (row.key_hash, row.prefix, row.name)
    assert types == ["api_key.created"]
    other = await desk.create("other", ApiKeyScope.READ, "admin@broker.example")
    assert other.key != made.key

    found = await desk.authenticate(made.key)
    assert found is not None and found.id == made.info.id and found.scope == ApiKeyScope.WRITE
    for wrong in ["", "sr_", made.key[:-1], made.key + "A", made.key.upper(), "x" * 500]:
        assert await desk.authenticate(wrong) is None

    revoked = await desk.revoke(made.info.id, "admin@broker.example")
    assert revoked.revoked_at == clock.now
    assert await desk.authenticate(made.key) is None
    assert await desk.authenticate(other.key) is not None
    with pytest.raises(ApiKeyError, match="already revoked"):
        await desk.revoke(made.info.id, "admin@broker.example")
    with pytest.raises(ApiKeyNotFound):
        await desk.revoke("nosuchkey", "admin@broker.example")
    async with database.transaction() as session:
        events = (await session.scalars(select(Event).order_by(Event.id))).all()
    assert [e.type for e in events] == ["api_key.created", "api_key.created", "api_key.revoked"]
    assert events[-1].data == {
        "key_id": made.info.id,
        "name": "CRM Nord",
        "by": "admin@broker.example",
    }


async def test_last_use_is_written_at_most_once_a_minute(database: Database) -> None:
    clock = Clock()
    desk = ApiKeyDesk(database, clock)
    made = await desk.create("crm", ApiKeyScope.READ, "cli")
    started = clock.now
    assert (await desk.listing())[0].last_used_at is None
    await desk.authenticate(made.key)
    assert (await desk.listing())[0].last_used_at == started
    clock.now = started + timedelta(seconds=59)
    await desk.authenticate(made.key)
    assert (await desk.listing())[0].last_used_at == started
    clock.now = started + timedelta(seconds=61)
    await desk.authenticate(made.key)
    assert (await desk.listing())[0].last_used_at == clock.now


async def test_a_key_needs_a_name(database: Database) -> None:
    desk = ApiKeyDesk(database, Clock())
    for name in ["", "   ", "x" * 201]:
        with pytest.raises(ApiKeyError, match="name"):
            await desk.create(name, ApiKeyScope.READ, "cli")
    assert await desk.listing() == []
