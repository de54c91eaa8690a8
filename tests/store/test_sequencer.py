"""The journal's sequencer: writers insert without a global lock, the sequencer numbers and
chains in the order of writing, a crash between the two loses nothing, two sequencers make
one chain, and a running relay chains on its own. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, select, text

from gateway.store import group_commit, journal
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED
from gateway.store.models import Event, JournalHead
from gateway.store.sequencer import BATCH, Sequencer, chain_all, chain_pass
from tests.conftest import Harness, StartRelay, make_message

WAIT = 20


def deleted(task: int, n: int = 0) -> journal.NewEvent:
    return BLOBS_DELETED.new({"count": task, "bytes": n})


async def write(db: Database, task: int, count: int = 1, at: datetime | None = None) -> list[int]:
    async with db.transaction() as session:
        return await journal.append(session, [deleted(task, n) for n in range(count)], at)


async def stored(db: Database) -> list[Event]:
    async with db.transaction() as session:
        return list((await session.scalars(select(Event).order_by(Event.id))).all())


async def head(db: Database) -> tuple[int, str]:
    async with db.transaction() as session:
        row = (await session.execute(select(JournalHead.seq, JournalHead.hash))).one()
    return row.seq, row.hash


async def until_chained(db: Database) -> journal.ChainReport:
    """Bounded: until `verify` finds nothing left to chain."""
    async with asyncio.timeout(WAIT):
        while (report := await journal.verify_database(db)).lag.unchained:
            await asyncio.sleep(0.02)
    return report


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    sent: list[str] = []

    def record(_conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


# -- writers ---------------------------------------------------------------------------------


async def test_writers_never_touch_the_chain_head(database: Database) -> None:
    with statements(database) as sent:
        await write(database, 1, 3)
        await group_commit.insert(database, [], [deleted(2)], datetime.now(UTC))
    assert sent and not any("journal_head" in s for s in sent), sent
    assert [(e.seq, e.prev_hash, e.hash) for e in await stored(database)] == [(None,) * 3] * 4
    assert await head(database) == (0, journal.GENESIS)


async def test_writers_commit_while_the_head_is_locked(database: Database) -> None:
    """On PostgreSQL a sequencer's pass holds the head row; writers in other transactions
    commit meanwhile (on SQLite one writer at a time is the database's own rule)."""
    if not database.is_postgres:
        await write(database, 1)
        assert len(await stored(database)) == 1
        return
    async with database.sessions() as holder:
        await holder.execute(select(JournalHead).with_for_update())  # the head row locked
        async with asyncio.timeout(WAIT):
            first, second = await asyncio.gather(write(database, 1, 2), write(database, 2, 2))
        assert await chain_pass(database) is None  # a background pass leaves it to the holder
        await holder.rollback()
    assert len(first) == len(second) == 2
    assert await chain_all(database) == 4
    assert (await journal.verify_database(database)).events == 4


# -- chaining --------------------------------------------------------------------------------


async def test_the_sequencer_chains_in_the_order_of_writing(database: Database) -> None:
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    for task in range(5):
        await write(database, task, 3, start + timedelta(minutes=task))
    waiting = await journal.verify_database(database)
    assert waiting == journal.ChainReport(0, lag=journal.Lag(15, start))
    assert waiting.lag.age(start + timedelta(seconds=90)) == 90
    assert await chain_pass(database, limit=4) == 4  # in batches, each its own transaction
    assert await chain_all(database) == 11
    assert await chain_all(database) == 0
    events = await stored(database)
    assert [e.seq for e in events] == list(range(1, 16))
    assert [(e.data["count"], e.data["bytes"]) for e in events] == [
        (task, n) for task in range(5) for n in range(3)
    ]
    assert events[0].prev_hash == journal.GENESIS
    assert all(e.prev_hash == before.hash for before, e in pairwise(events))
    assert await head(database) == (15, events[-1].hash)
    assert await journal.verify_database(database) == journal.ChainReport(15)
    # what was chained before goes on: new events continue the same chain
    await write(database, 9)
    await chain_all(database)
    assert await journal.verify_database(database) == journal.ChainReport(16)


async def test_more_than_a_batch_is_chained_in_several_passes(database: Database) -> None:
    await group_commit.insert(
        database, [], [deleted(0, n) for n in range(BATCH + 5)], datetime.now(UTC)
    )
    assert await chain_all(database) == BATCH + 5
    assert await journal.verify_database(database) == journal.ChainReport(BATCH + 5)


async def test_two_sequencers_at_once_make_one_gapless_chain(database_url: str) -> None:
    """Two processes' sequencers (two engines here) chain while writers write."""
    first, second = Database.connect(database_url), Database.connect(database_url)
    try:
        await first.upgrade()
        done = asyncio.Event()

        async def writer(task: int) -> None:
            for n in range(15):
                await write(first if n % 2 else second, task, 2)

        async def sequencer(db: Database) -> int:
            passes = 0
            while not done.is_set():
                await chain_pass(db, limit=7)
                passes += 1
                await asyncio.sleep(0)
            return passes

        sequencers = [asyncio.create_task(sequencer(db)) for db in (first, second)]
        async with asyncio.timeout(60):
            await asyncio.gather(*(writer(t) for t in range(4)))
            done.set()
            assert all(await asyncio.gather(*sequencers))
        await chain_all(second)
        events = await stored(first)
        assert len(events) == 4 * 15 * 2
        assert sorted(e.seq for e in events if e.seq is not None) == list(range(1, 121))
        assert await journal.verify_database(first) == journal.ChainReport(120)
    finally:
        await first.close()
        await second.close()


# -- a crash between insert and chaining -----------------------------------------------------

CRASHING_WRITER = """
import asyncio, sys
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED

async def main() -> None:
    db = Database.connect(sys.argv[1])
    n = 0
    while True:
        async with db.transaction() as session:
            await journal.append(session, [BLOBS_DELETED.new({"count": n, "bytes": 0})])
        n += 1
        print(n, flush=True)

asyncio.run(main())
"""


async def test_events_committed_before_a_kill_are_chained_by_the_next_start(
    database_url: str,
) -> None:
    """A process commits events and is killed (SIGKILL) before any sequencer chained them:
    nothing is lost, `verify` says they wait, and the next start's first pass chains them."""
    db = Database.connect(database_url)
    try:
        await db.upgrade()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CRASHING_WRITER,
            database_url,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert child.stdout is not None
        async with asyncio.timeout(WAIT):
            while int(await child.stdout.readline() or b"0") < 20:
                assert child.returncode is None
        child.send_signal(signal.SIGKILL)
        await child.wait()
        assert child.returncode == -signal.SIGKILL
        committed = len(await stored(db))
        assert committed >= 20
        waiting = await journal.verify_database(db)
        assert waiting.ok and waiting.events == 0 and waiting.lag.unchained == committed

        restarted = Sequencer(db, interval=3600)  # its first pass, not its timer
        restarted.start()
        assert await until_chained(db) == journal.ChainReport(committed)
        assert [e.data["count"] for e in await stored(db)] == list(range(committed))
    finally:
        await db.close()


# -- the sequencer at work -------------------------------------------------------------------


async def test_commits_wake_the_sequencer_and_closing_chains_what_is_left(
    database: Database,
) -> None:
    sequencer = Sequencer(database, interval=3600)  # no timer: only commits wake it
    sequencer.start()
    await write(database, 1, 2)
    assert await until_chained(database) == journal.ChainReport(2)
    await group_commit.insert(database, [], [deleted(2)], datetime.now(UTC))
    assert await until_chained(database) == journal.ChainReport(3)

    queued = [
        asyncio.create_task(group_commit.insert(database, [], [deleted(3, n)], datetime.now(UTC)))
        for n in range(5)
    ]
    await asyncio.sleep(0)  # queued for the group commit, none committed yet
    await database.close()  # the group commit drains first, then the sequencer chains it
    assert all(task.done() and task.exception() is None for task in queued)
    report = await journal.verify_database(database)  # the pool opens again
    assert report == journal.ChainReport(8)


async def test_a_running_relay_chains_its_events_on_its_own(relay: Harness) -> None:
    db = relay.relay.db
    await relay.send(make_message(to="p@example.com"))
    await relay.sink.expect(1)
    report = await until_chained(db)
    assert report.ok and report.events >= 3  # user, received, queued, delivered
    async with db.transaction() as session:
        types = list(await session.scalars(select(Event.type).order_by(Event.seq)))
    assert {"message.received", "delivery.queued"} <= set(types)


async def test_a_relay_that_stops_leaves_a_shared_database_to_the_others(
    relay_factory: StartRelay, database: Database
) -> None:
    """Relays given one Database (these tests start several) do not close it under each
    other: the one left keeps taking, delivering and chaining after the other stopped. The
    first one's stop used to run every close hook, the other's sequencer included, and to
    dispose of the pool while the other's group commit waited for a connection."""
    first = await relay_factory(roles={"smtp"})
    second = await relay_factory()
    await first.relay.stop()
    await second.send(make_message(to="p@example.com"))
    await second.sink.expect(1)
    report = await until_chained(database)
    assert report.ok and report.events >= 3


async def test_a_stopped_relay_leaves_nothing_unchained(relay: Harness) -> None:
    db = relay.relay.db
    await relay.send(make_message(to="p@example.com"))
    await relay.relay.stop()
    report = await journal.verify_database(db)
    assert report.ok and report.lag == journal.Lag() and report.events >= 2
    async with db.transaction() as session:
        assert await session.scalar(text("SELECT COUNT(*) FROM events WHERE seq IS NULL")) == 0
