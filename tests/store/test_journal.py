"""The journal: events written with the state they describe, one hash chain that `verify`
walks, and tampering that it catches, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import delete, func, select, update

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED, POLICY_KEPT
from gateway.store.models import Delivery, DeliveryStatus, Event, JournalHead, Message, utcnow
from gateway.store.sequencer import chain_all
from tests.cli_runner import sealrelay, sqlite_url, write_config
from tests.conftest import Harness, make_message

WAIT = 20


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    return result


async def all_events(db: Database) -> list[Event]:
    async with db.transaction() as session:
        return list((await session.scalars(select(Event).order_by(Event.seq))).all())


async def written_events(db: Database) -> list[Event]:
    """Every event in the order it was written, chained or not yet."""
    async with db.transaction() as session:
        return list((await session.scalars(select(Event).order_by(Event.id))).all())


async def all_deliveries(db: Database) -> list[Delivery]:
    async with db.transaction() as session:
        return list((await session.scalars(select(Delivery))).all())


async def verify(db: Database) -> journal.ChainReport:
    async with db.transaction() as session:
        return await journal.verify(session)


async def chained_and_verified(db: Database) -> journal.ChainReport:
    """`verify` once the relay's sequencer has chained everything written so far."""

    async def all_chained() -> journal.ChainReport | None:
        report = await journal.verify_database(db)  # the walk and the lag of one snapshot
        return report if report.lag.unchained == 0 else None

    return await eventually(all_chained)  # type: ignore[no-any-return]


# -- events with their state -----------------------------------------------------------------


async def test_a_relay_run_leaves_one_verified_chain_matching_the_state(relay: Harness) -> None:
    db, sink = relay.relay.db, relay.sink
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user"
    sink.refuse["later@example.net"] = "451 4.3.0 try later"
    await relay.send(make_message(to="ok@example.com, gone@example.org, later@example.net"))
    await relay.send(make_message(to="second@example.com", subject="Zweites"))

    async def later_retried() -> bool:
        rows = {d.recipient: d for d in await all_deliveries(db)}
        return "later@example.net" in rows and rows["later@example.net"].attempts >= 2

    await eventually(later_retried)
    del sink.refuse["later@example.net"]

    async def settled() -> list[Delivery] | None:
        rows = await all_deliveries(db)
        done = len(rows) == 5 and all(d.status != DeliveryStatus.QUEUED for d in rows)
        return rows if done else None

    rows = await eventually(settled)
    report = await chained_and_verified(db)
    assert report.ok, report
    events = await all_events(db)
    assert report.events == len(events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    async with db.transaction() as session:
        head = (await session.scalars(select(JournalHead))).one()
    assert (head.seq, head.hash) == (events[-1].seq, events[-1].hash)

    counts = Counter(e.type for e in events)
    deferred = counts.pop("delivery.deferred")
    assert deferred >= 2
    assert counts == {
        "user.created": 1,
        "message.received": 2,
        "delivery.queued": 4,
        "delivery.delivered": 4,  # ok, second, later and the DSN
        "delivery.bounced": 1,
        "bounce.queued": 1,
    }
    # Each settled delivery's last event says what its row says, written at the same moment.
    final = {
        DeliveryStatus.DELIVERED: "delivery.delivered",
        DeliveryStatus.BOUNCED: "delivery.bounced",
    }
    for delivery in rows:
        own = [e for e in events if e.delivery_id == delivery.id]
        assert own[-1].type == final[DeliveryStatus(delivery.status)]
        assert own[-1].at == delivery.updated_at
        assert own[-1].data["attempt"] == delivery.attempts
        assert own[-1].data["recipient"] == delivery.recipient


async def test_state_and_its_events_commit_or_roll_back_together(
    relay: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, sink = relay.relay.db, relay.sink
    before = await written_events(db)
    real_append_rows = journal.append_rows
    failed = asyncio.Event()

    def append_rows_failing_on(
        types: set[str], connection: Any, batches: Sequence[tuple[Sequence[Any], Any]]
    ) -> int:
        if any(e.type in types for news, _at in batches for e in news):
            failed.set()
            raise RuntimeError("the journal is unavailable")
        return real_append_rows(connection, batches)

    # Intake: without its journal events the message is not accepted at all.
    monkeypatch.setattr(
        journal, "append_rows", lambda *a: append_rows_failing_on({"message.received"}, *a)
    )
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await relay.send(make_message(to="p@example.com"))
    assert refused.value.code == 451
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 0
    assert await all_deliveries(db) == []

    # Delivery: the copy went out, but its outcome could not be journaled, so it is not
    # recorded either; the row stays queued under the worker's lease (sent again later).
    failed.clear()
    monkeypatch.setattr(
        journal, "append_rows", lambda *a: append_rows_failing_on({"delivery.delivered"}, *a)
    )
    await relay.send(make_message(to="p@example.com"))
    await sink.expect(1)
    async with asyncio.timeout(WAIT):
        await failed.wait()
    [delivery] = await all_deliveries(db)
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.attempts == 0 and delivery.leased_by == relay.relay.worker.name
    events = await written_events(db)
    assert [e.type for e in events[len(before) :]] == ["message.received", "delivery.queued"]
    assert (await chained_and_verified(db)).ok


# -- tampering -------------------------------------------------------------------------------


async def append_events(db: Database, count: int) -> list[Event]:
    start = utcnow()
    for i in range(count):
        async with db.transaction() as session:
            await journal.append(
                session,
                [
                    POLICY_KEPT.new(
                        {"recipient": f"p{i}@example.com", "reason": f"Exposé ✓ {i}"},
                        message_id=f"m{i}",
                    )
                ],
                start + timedelta(seconds=i),
            )
    await chain_all(db)
    return await all_events(db)


async def rehash(db: Database, seq: int, data: dict[str, Any]) -> None:
    """A forger who changes an event and recomputes its own hash (but not its successors)."""
    async with db.transaction() as session:
        event = (await session.scalars(select(Event).where(Event.seq == seq))).one()
        event.data = data
        event.hash = journal.event_hash(
            event.prev_hash, event.seq, event.at, event.type, event.message_id, None, data
        )


TAMPERING = {
    "update data": (
        lambda db: _execute(db, update(Event).where(Event.seq == 3).values(data={"n": 99})),
        3,
        "content does not match its hash",
    ),
    "update time": (
        lambda db: _execute(
            db, update(Event).where(Event.seq == 2).values(at=datetime(2020, 1, 1, tzinfo=UTC))
        ),
        2,
        "content does not match its hash",
    ),
    "delete a middle event": (
        lambda db: _execute(db, delete(Event).where(Event.seq == 3)),
        3,
        "event 3 is missing",
    ),
    "delete the first event": (
        lambda db: _execute(db, delete(Event).where(Event.seq == 1)),
        1,
        "event 1 is missing",
    ),
    "delete the last event": (
        lambda db: _execute(db, delete(Event).where(Event.seq == 5)),
        5,
        "the chain ends at 4 but its head says 5",
    ),
    "unchain an event": (
        lambda db: _execute(db, update(Event).where(Event.seq == 3).values(seq=None)),
        3,
        "event 3 is missing",
    ),
    "rehash a changed event": (
        lambda db: rehash(db, 3, {"n": 99}),
        4,
        "does not link to the event before it",
    ),
}


async def _execute(db: Database, statement: Any) -> None:
    async with db.transaction() as session:
        await session.execute(statement)


@pytest.mark.parametrize("tamper", TAMPERING)
async def test_verify_finds_where_the_chain_was_broken(database: Database, tamper: str) -> None:
    await append_events(database, 5)
    assert await verify(database) == journal.ChainReport(5)
    change, broken_at, reason = TAMPERING[tamper]
    await change(database)
    report = await verify(database)
    assert not report.ok
    assert report.broken_at == broken_at
    assert report.reason == reason
    assert report.events == broken_at - 1


async def test_verify_on_an_empty_journal(database: Database) -> None:
    assert await verify(database) == journal.ChainReport(0)


async def test_events_stamped_in_another_zone_still_verify(database: Database) -> None:
    """The hash covers the time as stored (UTC), whatever zone the caller's clock gave."""
    berlin = timezone(timedelta(hours=1))
    async with database.transaction() as session:
        [event_id] = await journal.append(
            session,
            [BLOBS_DELETED.new({"count": 0, "bytes": 0})],
            datetime(2026, 11, 5, 10, 0, tzinfo=berlin),
        )
    await chain_all(database)
    assert await verify(database) == journal.ChainReport(1)
    [stored] = await all_events(database)
    assert stored.id == event_id
    assert stored.at == datetime(2026, 11, 5, 9, 0, tzinfo=UTC)


async def test_cli_verify_journal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    db = Database.connect(sqlite_url(config))
    await db.upgrade()
    await append_events(db, 4)
    await db.close()

    ok = await sealrelay("verify", "--journal", "-c", str(config))
    assert (ok.code, ok.out) == (0, "journal OK: 4 events, chain intact\n")

    # written, and no relay ran to chain it: the chain is intact, the event still waits
    db = Database.connect(sqlite_url(config))
    async with db.transaction() as session:
        await journal.append(
            session,
            [BLOBS_DELETED.new({"count": 0, "bytes": 0})],
            datetime(2026, 11, 5, 9, 0, tzinfo=UTC),
        )
    await db.close()
    waiting = await sealrelay("verify", "--journal", "-c", str(config))
    assert waiting.code == 0
    assert re.fullmatch(
        r"journal OK: 4 events, chain intact\n"
        r"journal: 1 event not chained yet, the oldest written 2026-11-05 09:00:00 UTC, \d+ s"
        r" ago \(a running relay chains them within database.chain_interval\)\n",
        waiting.out,
    ), waiting.out

    with sqlite3.connect(tmp_path / "relay.db") as connection:
        connection.execute("UPDATE events SET data = '{\"n\": 7}' WHERE seq = 2")
    tampered = await sealrelay("verify", "--journal", "-c", str(config))
    assert tampered.code == 1
    first, second = tampered.out.splitlines()
    assert first == (
        "journal NOT OK: event 2 content does not match its hash (1 events verified before it)"
    )
    assert second.startswith("journal: 1 event not chained yet")


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_keep_one_unbroken_chain(database: Database) -> None:
    tasks, per_task = 40, 3

    async def writer(task: int) -> None:
        async with database.transaction() as session:
            await journal.append(
                session,
                [
                    # count: which task wrote it, bytes: its place in that task's batch
                    BLOBS_DELETED.new({"count": task, "bytes": i})
                    for i in range(per_task)
                ],
            )

    await asyncio.gather(*(writer(t) for t in range(tasks)))
    await chain_all(database)
    report = await verify(database)
    assert report == journal.ChainReport(tasks * per_task)
    events = await all_events(database)
    assert [e.seq for e in events] == list(range(1, tasks * per_task + 1))
    # The chain follows the order of writing: a transaction's events keep their order
    # (writers no longer hold the head, so other transactions' events may fall between).
    assert [e.id for e in events] == sorted(e.id for e in events)
    by_task: dict[int, list[int]] = {}
    for event in events:
        by_task.setdefault(event.data["count"], []).append(event.data["bytes"])
    assert len(by_task) == tasks
    for places in by_task.values():
        assert places == list(range(per_task))
