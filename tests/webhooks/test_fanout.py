"""The fan-out: every journal event once per matching endpoint, none skipped, in seq order,
also when fan-outs run at once, and the journal property it rests on (a seq is visible only
once every lower one is, whatever order the writers committed in). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import func, select

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED, USER_CREATED
from gateway.store.models import Event, WebhookCursor, WebhookDelivery, utcnow
from gateway.store.sequencer import chain_all
from gateway.webhooks.desk import WebhookDesk
from gateway.webhooks.fanout import fan_out_batch

PUBLIC = "http://93.184.215.14/hooks"


async def append(db: Database, count: int) -> None:
    """Write `count` events and chain them, as a relay's sequencer would."""
    async with db.transaction() as session:
        await journal.append(
            session, [BLOBS_DELETED.new({"count": n, "bytes": 0}) for n in range(count)]
        )
    await chain_all(db)


async def fan_out_all(db: Database) -> int:
    total = 0
    while True:
        async with db.transaction() as session:
            count = await fan_out_batch(session, utcnow(), limit=7)
        total += count
        if not count:
            return total


async def fanned(db: Database) -> Counter[tuple[str, int]]:
    async with db.transaction() as session:
        rows = await session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.event_seq))
        return Counter((endpoint, seq) for endpoint, seq in rows)


async def cursor(db: Database) -> int:
    async with db.transaction() as session:
        row = await session.get(WebhookCursor, 1)
        assert row is not None
        return row.seq


async def test_each_event_goes_once_to_each_endpoint_that_wants_it(database: Database) -> None:
    desk = WebhookDesk(database)
    every = (await desk.create(PUBLIC)).endpoint
    users_only = (await desk.create(PUBLIC, event_types=["user.created"])).endpoint
    off = (await desk.create(PUBLIC)).endpoint
    await desk.disable(off.id)
    await append(database, 20)
    async with database.transaction() as session:
        await journal.append(session, [USER_CREATED.new({"email": "a@b.example", "admin": False})])
    await chain_all(database)
    # Fan-outs running at once (several instances) still write each delivery once.
    await asyncio.gather(*(fan_out_all(database) for _ in range(3)))
    await fan_out_all(database)
    async with database.transaction() as session:
        events = list(await session.scalars(select(Event).order_by(Event.seq)))
    deliveries = await fanned(database)
    assert set(deliveries.values()) == {1}
    created_at = {every.id: every.created_at, users_only.id: users_only.created_at}
    expected = {
        (endpoint, e.seq)
        for e in events
        for endpoint in (every.id, users_only.id)
        if e.at >= created_at[endpoint] and (endpoint == every.id or e.type == "user.created")
    }
    assert set(deliveries) == expected
    assert (users_only.id, events[-1].seq) in deliveries
    assert not any(endpoint == off.id for endpoint, _ in deliveries)
    assert await cursor(database) == events[-1].seq


async def test_an_event_committed_late_is_chained_late_and_never_passed(
    database: Database,
) -> None:
    """Writers do not wait for one another; the sequencer numbers only what is committed, so
    an event whose transaction commits late gets a later seq than one written after it, and
    the fan-out, already past the earlier number, still takes it."""
    await WebhookDesk(database).create(PUBLIC)
    await chain_all(database)
    await fan_out_all(database)
    start = await cursor(database)

    first_appended = asyncio.Event()
    commit_first = asyncio.Event()

    async def first() -> None:
        async with database.transaction() as session:
            await journal.append(session, [BLOBS_DELETED.new({"count": 1, "bytes": 1})])
            first_appended.set()
            await commit_first.wait()

    holder = asyncio.create_task(first())
    await first_appended.wait()
    if database.is_postgres:
        # the second writer commits while the first is still open: no lock held it
        async with asyncio.timeout(20):
            async with database.transaction() as session:
                await journal.append(session, [BLOBS_DELETED.new({"count": 2, "bytes": 2})])
            assert await chain_all(database) == 1  # the first is not committed: not seen
        assert await fan_out_all(database) == 1
        assert await cursor(database) == start + 1
        commit_first.set()
        await holder
    else:
        # SQLite has one writer: the second waits for the first to commit.
        second = asyncio.create_task(append(database, 1))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not second.done()
        commit_first.set()
        await holder
        await second
    await chain_all(database)
    assert await fan_out_all(database) == (1 if database.is_postgres else 2)
    async with database.transaction() as session:
        rows = (
            await session.execute(
                select(Event.seq, Event.id, Event.data).where(Event.seq > start).order_by(Event.seq)
            )
        ).all()
    seqs = [seq for seq, _, _ in rows]
    assert seqs == [start + 1, start + 2]
    if database.is_postgres:  # written first, committed last: chained second
        assert [data["count"] for _, _, data in rows] == [2, 1]
        assert rows[0].id > rows[1].id
    assert await cursor(database) == start + 2
    assert sorted(seq for _, seq in await fanned(database) if seq > start) == seqs


async def test_without_endpoints_the_cursor_steps_to_the_chain_s_end(database: Database) -> None:
    """With no endpoint enabled nothing is loaded or written, but the cursor still moves to
    the end of the chain (in steps of the batch), so an endpoint made later starts from there,
    and events not chained yet are not stepped over."""
    await append(database, 20)
    async with database.transaction() as session:
        await journal.append(session, [BLOBS_DELETED.new({"count": 99, "bytes": 0})])  # unchained
        head = await session.scalar(select(func.max(Event.seq)))
    assert head is not None
    assert await fan_out_all(database) >= 20  # in steps of 7
    assert await cursor(database) == head
    assert not await fanned(database)

    endpoint = (await WebhookDesk(database).create(PUBLIC)).endpoint  # journals its creation
    await chain_all(database)
    await append(database, 2)
    assert await fan_out_all(database) == 4
    assert await cursor(database) == head + 4
    seqs = {seq for _, seq in await fanned(database)}
    assert {head + 3, head + 4} <= seqs and head + 1 not in seqs  # 99 came before the endpoint
    assert {endpoint_id for endpoint_id, _ in await fanned(database)} == {endpoint.id}
