"""The fan-out: every journal event once per matching endpoint, none skipped, in seq order,
also when fan-outs run at once, and the journal property it rests on (seq order is commit
order). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import select, text

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED, USER_CREATED
from gateway.store.models import Event, WebhookCursor, WebhookDelivery, utcnow
from gateway.webhooks.desk import WebhookDesk
from gateway.webhooks.fanout import fan_out_batch

PUBLIC = "http://93.184.215.14/hooks"


async def append(db: Database, count: int) -> None:
    async with db.transaction() as session:
        await journal.append(
            session, [BLOBS_DELETED.new({"count": n, "bytes": 0}) for n in range(count)]
        )


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


async def test_an_event_still_being_committed_is_never_passed(database: Database) -> None:
    """Appends serialize on the journal head row until they commit, so a fan-out never sees
    seq N+1 before seq N: the cursor cannot pass an event committed late."""
    await WebhookDesk(database).create(PUBLIC)
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
        # A second append waits for the head row; a fan-out meanwhile sees neither event.
        async with database.sessions() as probe:
            second_pid = asyncio.get_running_loop().create_future()

            async def second() -> None:
                async with database.transaction() as session:
                    pid = await session.scalar(text("select pg_backend_pid()"))
                    second_pid.set_result(pid)
                    await journal.append(session, [BLOBS_DELETED.new({"count": 2, "bytes": 2})])

            appender = asyncio.create_task(second())
            pid = await second_pid
            async with asyncio.timeout(20):
                while (
                    await probe.scalar(
                        text("select wait_event_type from pg_stat_activity where pid = :pid"),
                        {"pid": pid},
                    )
                ) != "Lock":
                    await asyncio.sleep(0.02)
                await probe.rollback()
            assert await fan_out_all(database) == 0
            assert await cursor(database) == start
            commit_first.set()
            await holder
            await appender
    else:
        # SQLite has one writer: the fan-out waits for the open append and then sees it.
        fan_out = asyncio.create_task(fan_out_all(database))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not fan_out.done()
        commit_first.set()
        await holder
        assert await fan_out == 1
        await append(database, 1)
    assert await fan_out_all(database) in (0, 1, 2)
    async with database.transaction() as session:
        seqs = list(await session.scalars(select(Event.seq).where(Event.seq > start)))
    assert seqs == [start + 1, start + 2]
    assert await cursor(database) == start + 2
    assert sorted(seq for _, seq in await fanned(database) if seq > start) == seqs
