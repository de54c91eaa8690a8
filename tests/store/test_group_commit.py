"""The group commit: many callers' units share one transaction, a bad unit fails alone, the
journal stays one verified chain, and closing the database commits what is queued. On SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from gateway.outbound import queue
from gateway.outbound.queue import new_delivery
from gateway.store import group_commit, journal, sqlite_lock
from gateway.store.db import Database
from gateway.store.events import POLICY_KEPT, NewEvent, UndeclaredEvent
from gateway.store.group_commit import Done
from gateway.store.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Message,
    MessageKind,
    new_id,
    utcnow,
)
from gateway.store.sequencer import chain_all
from tests.support import chained


def message(message_id: str | None = None) -> Message:
    """A message row with only what has no default (kind and subject come from defaults)."""
    return Message(
        id=message_id or new_id(),
        received_at=utcnow(),
        sender="agent@example.com",
        blob="0" * 64,
        size=1,
        message_id_header="<m@example.com>",
    )


def kept(message_id: str, n: int = 0) -> NewEvent:
    return POLICY_KEPT.new(
        {"recipient": f"p{n}@example.com", "reason": f"Exposé ✓ {n}"}, message_id=message_id
    )


@contextmanager
def counting_commits() -> Iterator[list[int]]:
    """Commits of every engine: on SQLite the group commit runs its batch through an engine
    of its own over the same connection (gateway/store/sqlite_thread.py)."""
    commits: list[int] = []

    def on_commit(_connection: Any) -> None:
        commits.append(1)

    event.listen(Engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(Engine, "commit", on_commit)


async def stored_ids(db: Database) -> set[str]:
    async with db.transaction() as session:
        return set((await session.scalars(select(Message.id))).all())


async def events_of(db: Database) -> list[Event]:
    """The journal, chained: the order of the chain is the order of writing."""
    await chain_all(db)
    async with db.transaction() as session:
        return list((await session.scalars(select(Event).order_by(Event.seq))).all())


async def test_concurrent_inserts_share_one_transaction_and_one_chain(database: Database) -> None:
    rows = [message() for _ in range(60)]
    at = utcnow()
    with counting_commits() as commits:
        await asyncio.gather(
            *(
                group_commit.insert(database, [row], [kept(row.id, n)], at + timedelta(seconds=n))
                for n, row in enumerate(rows)
            )
        )
    assert 1 <= len(commits) <= 2, f"{len(commits)} commits for 60 inserts"
    assert await stored_ids(database) == {row.id for row in rows}
    assert all(row.kind == MessageKind.SUBMITTED and row.subject == "" for row in rows)
    stored = await events_of(database)
    assert [e.seq for e in stored] == list(range(1, 61))
    assert [e.message_id for e in stored] == [row.id for row in rows]
    assert stored[7].at == at + timedelta(seconds=7)
    assert stored[3].data == {"recipient": "p3@example.com", "reason": "Exposé ✓ 3"}
    assert (await chained(database)).ok


async def test_the_orm_path_and_the_group_commit_extend_the_same_chain(
    database: Database,
) -> None:
    async with database.transaction() as session:
        await journal.append(session, [kept("m1", 1)], utcnow())
    await group_commit.insert(database, [], [kept("m2", 2), kept("m3", 3)], utcnow())
    async with database.transaction() as session:
        await journal.append(session, [kept("m4", 4)], utcnow())
    stored = await events_of(database)
    assert [(e.seq, e.message_id) for e in stored] == [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4")]
    assert (await chained(database)).ok


async def test_a_failing_unit_fails_only_its_own_caller(database: Database) -> None:
    taken = message()
    await group_commit.insert(database, [taken], [], utcnow())
    good = [message() for _ in range(5)]
    half_done = message()

    def raises_after_writing(connection: Connection) -> Done[None]:
        connection.execute(insert(Message), [vars_of(message())])
        connection.execute(insert(Message), [{"id": half_done.id, "sender": None}])
        return Done(None)

    def undeclared_event(_connection: Connection) -> Done[str]:
        return Done("never", [NewEvent("no.such.event", "x", None, {})])

    with counting_commits() as commits:
        results = await asyncio.gather(
            group_commit.insert(database, [good[0]], [kept(good[0].id)], utcnow()),
            group_commit.insert(database, [message(taken.id)], [kept(taken.id)], utcnow()),
            group_commit.insert(database, [good[1]], [kept(good[1].id)], utcnow()),
            group_commit.submit(database, raises_after_writing),
            group_commit.insert(database, [good[2], good[3]], [kept(good[2].id)], utcnow()),
            group_commit.submit(database, undeclared_event),
            group_commit.insert(database, [good[4]], [kept(good[4].id)], utcnow()),
            return_exceptions=True,
        )
    assert len(commits) <= 3
    assert isinstance(results[1], IntegrityError)  # a duplicate id
    assert isinstance(results[3], IntegrityError)  # NOT NULL, after a row that was fine
    assert isinstance(results[5], UndeclaredEvent)
    assert [results[i] for i in (0, 2, 4, 6)] == [None] * 4
    assert await stored_ids(database) == {taken.id, *(row.id for row in good)}
    assert [e.message_id for e in await events_of(database)] == [
        good[0].id,
        good[1].id,
        good[2].id,
        good[4].id,
    ]
    assert (await chained(database)).ok


async def test_a_unit_alone_gets_its_own_error_and_the_writer_goes_on(
    database: Database,
) -> None:
    def broken(_connection: Connection) -> Done[None]:
        raise ValueError("broken unit")

    with pytest.raises(ValueError, match="broken unit"):
        await group_commit.submit(database, broken)
    row = message()
    await group_commit.insert(database, [row], [kept(row.id)], utcnow())
    assert await stored_ids(database) == {row.id}


async def test_results_come_back_to_each_caller(database: Database) -> None:
    def count_messages(n: int) -> group_commit.Unit[tuple[int, int]]:
        def unit(connection: Connection) -> Done[tuple[int, int]]:
            connection.execute(insert(Message), [vars_of(message())])
            total = connection.execute(select(func.count()).select_from(Message)).scalar_one()
            return Done((n, total))

        return unit

    results = await asyncio.gather(
        *(group_commit.submit(database, count_messages(n)) for n in range(10))
    )
    assert [n for n, _ in results] == list(range(10))
    assert [total for _, total in results] == list(range(1, 11))  # in order, one transaction


async def test_closing_the_database_commits_what_is_queued(database: Database) -> None:
    rows = [message() for _ in range(20)]
    pending = [
        asyncio.create_task(group_commit.insert(database, [row], [kept(row.id)], utcnow()))
        for row in rows
    ]
    await asyncio.sleep(0)  # every insert queued, none committed yet
    assert not any(task.done() for task in pending)
    await database.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert await stored_ids(database) == {row.id for row in rows}  # the pool opens again
    assert (await chained(database)).ok


def batch_sizes(db: Database) -> list[int]:
    """The size of each batch `db`'s writer commits from now on (committed as before)."""
    writer = group_commit._writer(db)
    sizes: list[int] = []
    commit = writer._commit

    async def counted(batch: list[Any]) -> None:
        sizes.append(len(batch))
        await commit(batch)

    writer._commit = counted  # type: ignore[method-assign]
    return sizes


def nothing(connection: Connection) -> Done[str]:
    return Done("done")


async def test_a_lingering_unit_commits_with_the_next_unit_that_may_not_wait(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome or a claim waits for company; a message whose client awaits its 250 does
    not, and takes it along: one transaction, however long the linger would have been."""
    monkeypatch.setattr(group_commit, "LINGER", 60.0)
    sizes = batch_sizes(database)
    writer = group_commit._writer(database)
    lingering = writer.put(nothing, linger=True)
    while writer.queue.qsize():
        await asyncio.sleep(0)  # until the writer has taken it and lingers
    row = message()
    async with asyncio.timeout(10):
        await group_commit.insert(database, [row], [kept(row.id)], utcnow())
        assert await lingering == "done"
    assert sizes == [2]
    assert await stored_ids(database) == {row.id}


async def test_a_lingering_unit_alone_commits_once_the_linger_is_over(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "LINGER", 0.2)
    sizes = batch_sizes(database)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(10):
        assert await group_commit.submit(database, nothing, linger=True) == "done"
        assert await group_commit.submit(database, nothing, linger=True) == "done"
    assert loop.time() - began >= 0.4  # each waited its linger, in vain
    assert sizes == [1, 1]


async def test_closing_the_database_commits_a_lingering_unit_at_once(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "LINGER", 60.0)
    writer = group_commit._writer(database)
    lingering = writer.put(nothing, linger=True)
    while writer.queue.qsize():
        await asyncio.sleep(0)  # until the writer has taken it and lingers
    async with asyncio.timeout(10):  # not the linger's 60 s
        await database.close()
    assert lingering.done() and lingering.result() == "done"


def vars_of(row: Message) -> dict[str, Any]:
    return {k: v for k, v in vars(row).items() if not k.startswith("_")}


async def test_claims_and_outcomes_join_the_group_and_respect_leases(database: Database) -> None:
    now = utcnow()
    row = message()
    copies = [new_delivery(row.id, f"p{n}@example.com", row.blob, now, 3600) for n in range(3)]
    await group_commit.insert(database, [row, *copies], [], now)
    later = message()
    with counting_commits() as commits:
        claimed, _ = await asyncio.gather(
            group_commit.submit(database, queue.Claim("w1", now, timedelta(minutes=5), 2)),
            group_commit.insert(database, [later], [kept(later.id)], now),
        )
    assert len(commits) == 1
    assert {c.delivery.recipient for c in claimed} <= {d.recipient for d in copies}
    assert all(c.message.id == row.id and c.login_changed is None for c in claimed)
    first, second = (c.delivery for c in claimed)
    bounce = Message(
        id=new_id(), received_at=now, sender="", blob="1" * 64, size=1, message_id_header=""
    )
    bounce_copy = new_delivery(bounce.id, row.sender, bounce.blob, now, 3600)
    bounced_event = POLICY_KEPT.new({"recipient": "x", "reason": "dsn"}, message_id=bounce.id)

    # Another worker's outcome for a copy it does not hold is refused, and its DSN not queued.
    lost = await group_commit.submit(
        database,
        queue.Settle(
            "w2", now, [queue.bounced(first, "550 no", status="5.0.0")], [bounce, bounce_copy]
        ),
    )
    assert lost == [None]
    assert bounce.id not in await stored_ids(database)

    outcomes = await group_commit.submit(
        database,
        queue.Settle(
            "w1",
            now,
            [queue.delivered(second, "mx.example"), queue.bounced(first, "550 no", status="5.0.0")],
            [bounce, bounce_copy],
            [bounced_event],
        ),
    )
    assert [e.type if e else None for e in outcomes] == ["delivery.delivered", "delivery.bounced"]
    assert bounce.id in await stored_ids(database)
    async with database.transaction() as session:
        states = {
            d.id: (d.status, d.attempts, d.leased_by)
            for d in await session.scalars(select(Delivery))
        }
    assert states[second.id] == (DeliveryStatus.DELIVERED, 1, None)
    assert states[first.id] == (DeliveryStatus.BOUNCED, 1, None)
    assert states[bounce_copy.id][0] == DeliveryStatus.QUEUED
    types = [e.type for e in await events_of(database)]
    assert types == ["policy.kept", "delivery.delivered", "delivery.bounced", "policy.kept"]
    assert (await chained(database)).ok


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_on_sqlite_a_batch_runs_off_the_event_loop(database: Database) -> None:
    """On SQLite the batch runs whole on the driver's thread (gateway/store/sqlite_thread.py):
    a slow unit leaves the event loop free, and the batch is committed as usual. (On
    PostgreSQL the units run on the loop, each statement through asyncpg.)"""
    threads: list[int] = []
    row = message()

    def slow(connection: Connection) -> Done[None]:
        threads.append(threading.get_ident())
        time.sleep(0.3)  # a unit that takes its time: the loop must not wait for it
        connection.execute(insert(Message), [vars_of(row)])
        return Done(None, [kept(row.id)])

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        await group_commit.submit(database, slow)
    finally:
        ticker.cancel()
    assert threads and threading.get_ident() not in threads
    assert ticks >= 5, f"the event loop ran {ticks} times in 0.3 s"
    assert await stored_ids(database) == {row.id}
    assert (await chained(database)).ok


def other_process_writing(tmp_path: Path) -> sqlite3.Connection:
    """A connection of its own to the test's SQLite file, holding its write lock."""
    other = sqlite3.connect(
        tmp_path / "relay.db", timeout=0, isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    return other


async def write_row(database: Database, row: Message, path: str) -> None:
    """The row written by the group commit's batch or by an ORM transaction."""
    if path == "orm":
        async with database.transaction() as session:
            session.add(row)
    else:
        await group_commit.insert(database, [row], [kept(row.id)], utcnow())


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("path", ["group commit", "orm"])
async def test_on_sqlite_a_write_waits_for_another_process_lock_by_polling(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Another process's write lock on the file (here: another connection's) is waited for
    in half-millisecond polls (gateway/store/sqlite_lock.py), not in SQLite's busy handler,
    whose sleeps grow to 25 ms and more; the write commits once the lock is free. Both ways
    of writing: the group commit's batch and an ORM transaction."""
    other = other_process_writing(tmp_path)
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            other.execute("COMMIT")

    monkeypatch.setattr(sqlite_lock, "sleep", pause)
    row = message()
    try:
        await write_row(database, row, path)
    finally:
        other.close()
    assert pauses == [sqlite_lock.FAST_POLL] * 2
    assert await stored_ids(database) == {row.id}
    assert (await chained(database)).ok


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("path", ["group commit", "orm"])
async def test_on_sqlite_a_lock_held_too_long_is_sqlalchemys_operational_error(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Past the busy timeout the write fails as it did through the engine: an
    `OperationalError` of SQLAlchemy's, which the front and the CLI take for a database they
    cannot use now (451, a clear error); nothing is written, and the next write goes through."""
    monkeypatch.setattr(sqlite_lock, "SQLITE_BUSY_TIMEOUT_MS", 30)
    other = other_process_writing(tmp_path)
    row = message()
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            await write_row(database, row, path)
    finally:
        other.close()
    assert await stored_ids(database) == set()
    await write_row(database, row, path)
    assert await stored_ids(database) == {row.id}


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_on_sqlite_a_connection_comes_back_rolled_back_only_when_a_transaction_is_open(
    database: Database,
) -> None:
    """The pool's rollback on check-in is skipped when nothing is open (a group commit's
    batch ends committed on the driver's thread); a connection given back inside a
    transaction is still rolled back, so the next user never inherits it."""
    row = message()
    await group_commit.insert(database, [row], [kept(row.id)], row.received_at)
    async with database.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        assert not driver._conn.in_transaction
        await driver.execute("BEGIN IMMEDIATE")
        await driver.execute("DELETE FROM messages")
        assert driver._conn.in_transaction
    async with database.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert not driver._conn.in_transaction  # the open one was rolled back
    assert await stored_ids(database) == {row.id}
