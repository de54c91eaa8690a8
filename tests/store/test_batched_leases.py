"""The holds and settles of one group commit run together (two statements for the batch,
not one per group) and keep what each did alone: a copy is held and settled only by the
worker that holds its lease, once, with its journal event; a unit that fails fails alone.
On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy import select, update

from gateway.outbound import queue
from gateway.outbound.queue import new_delivery
from gateway.store import group_commit
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, Event, Message, new_id, utcnow
from gateway.store.sequencer import chain_all
from tests.store.test_group_commit import counting_commits, message

LEASE = timedelta(minutes=5)


async def claimed_copies(db: Database, count: int, now: datetime) -> list[Delivery]:
    """`count` copies of their own messages, all claimed by w1 (each its own group)."""
    rows: list[Message | Delivery] = []
    for n in range(count):
        row = message()
        rows += [row, new_delivery(row.id, f"p{n}@example.com", row.blob, now, 3600)]
    await group_commit.insert(db, rows, [], now)
    claimed = await group_commit.submit(db, queue.Claim("w1", now, LEASE, count))
    assert len(claimed) == count
    return [c.delivery for c in claimed]


async def take_over(db: Database, copy: Delivery, worker: str, until: datetime) -> None:
    """Another worker's claim of `copy`, as after w1's lease ran out."""
    async with db.transaction() as session:
        await session.execute(
            update(Delivery)
            .where(Delivery.id == copy.id)
            .values(leased_by=worker, lease_until=until)
        )


async def states(db: Database) -> dict[str, tuple[str, int, str | None, datetime | None]]:
    async with db.transaction() as session:
        return {
            d.id: (d.status, d.attempts, d.leased_by, d.lease_until)
            for d in await session.scalars(select(Delivery))
        }


async def journaled(db: Database) -> list[tuple[str, str | None]]:
    await chain_all(db)
    async with db.transaction() as session:
        events = await session.scalars(select(Event).order_by(Event.seq))
        return [(e.type, e.delivery_id) for e in events]


async def test_holds_of_one_batch_keep_only_the_leases_each_worker_still_has(
    database: Database,
) -> None:
    now = utcnow()
    copies = await claimed_copies(database, 4, now)
    taken_until = now + timedelta(minutes=1)
    await take_over(database, copies[1], "w2", taken_until)
    until = now + timedelta(minutes=10)
    with counting_commits() as commits:
        held = await asyncio.gather(
            group_commit.submit(database, queue.Hold("w1", [copies[0].id], until)),
            group_commit.submit(database, queue.Hold("w1", [copies[1].id, copies[2].id], until)),
            group_commit.submit(database, queue.Hold("w2", [copies[3].id], until)),
            group_commit.submit(database, queue.Hold("w2", [copies[1].id], until)),
        )
    assert len(commits) == 1
    assert held == [{copies[0].id}, {copies[2].id}, set(), {copies[1].id}]
    after = await states(database)
    assert after[copies[0].id][2:] == ("w1", until)
    assert after[copies[2].id][2:] == ("w1", until)
    assert after[copies[3].id][2:] == ("w1", now + LEASE)  # w2 does not hold it: unchanged
    assert after[copies[1].id][2:] == ("w2", until)


async def test_a_hold_never_shortens_a_lease(database: Database) -> None:
    now = utcnow()
    (copy,) = await claimed_copies(database, 1, now)
    held = await group_commit.submit(database, queue.Hold("w1", [copy.id], now + timedelta(1)))
    assert held == {copy.id}
    held = await group_commit.submit(database, queue.Hold("w1", [copy.id], now))
    assert held == {copy.id}
    assert (await states(database))[copy.id][3] == now + timedelta(1)


async def test_settles_of_one_batch_record_each_outcome_once_where_the_lease_is_held(
    database: Database,
) -> None:
    now = utcnow()
    copies = await claimed_copies(database, 5, now)
    await take_over(database, copies[2], "w2", now + LEASE)
    retry = now + timedelta(minutes=3)
    with counting_commits() as commits:
        results = await asyncio.gather(
            group_commit.submit(
                database, queue.Settle("w1", now, [queue.delivered(copies[0], "mx.example")])
            ),
            # lost mid-batch: another worker took copies[2] over
            group_commit.submit(
                database,
                queue.Settle(
                    "w1",
                    now,
                    [queue.delivered(copies[1], "mx"), queue.delivered(copies[2], "mx")],
                ),
            ),
            group_commit.submit(
                database, queue.Settle("w1", now, [queue.deferred(copies[3], "451 later", retry)])
            ),
            group_commit.submit(
                database,
                queue.Settle("w1", now, [queue.bounced(copies[4], "550 no", status="5.1.1")]),
            ),
            # the same copy twice in one batch: recorded once
            group_commit.submit(
                database, queue.Settle("w1", now, [queue.delivered(copies[0], "mx.example")])
            ),
        )
    assert len(commits) == 1
    types = [[e.type if e else None for e in outcome] for outcome in results]
    assert types == [
        ["delivery.delivered"],
        ["delivery.delivered", None],
        ["delivery.deferred"],
        ["delivery.bounced"],
        [None],
    ]
    after = await states(database)
    assert after[copies[0].id][:3] == (DeliveryStatus.DELIVERED, 1, None)
    assert after[copies[1].id][:3] == (DeliveryStatus.DELIVERED, 1, None)
    assert after[copies[2].id][:3] == (DeliveryStatus.QUEUED, 0, "w2")
    assert after[copies[3].id] == (DeliveryStatus.QUEUED, 1, None, None)
    assert after[copies[4].id][:3] == (DeliveryStatus.BOUNCED, 1, None)
    async with database.transaction() as session:
        deferred = await session.get(Delivery, copies[3].id)
        assert deferred is not None
        assert (deferred.next_attempt_at, deferred.last_error) == (retry, "451 later")
        assert deferred.updated_at == now
        bounced = await session.get(Delivery, copies[4].id)
        assert bounced is not None and bounced.last_error == "550 no"
    assert await journaled(database) == [
        ("delivery.delivered", copies[0].id),
        ("delivery.delivered", copies[1].id),
        ("delivery.deferred", copies[3].id),
        ("delivery.bounced", copies[4].id),
    ]


async def test_a_settle_that_fails_in_a_batch_fails_alone(database: Database) -> None:
    now = utcnow()
    copies = await claimed_copies(database, 3, now)
    taken = message()
    await group_commit.insert(database, [taken], [], now)
    # its DSN's message row has an id already stored: the unit fails after its UPDATE
    dsn_copy = new_delivery(taken.id, "agent@example.com", taken.blob, now, 3600)
    failing = queue.Settle(
        "w1",
        now,
        [queue.bounced(copies[1], "550 no", status="5.0.0")],
        [message(taken.id), dsn_copy],
    )
    results = await asyncio.gather(
        group_commit.submit(database, queue.Settle("w1", now, [queue.delivered(copies[0], "a")])),
        group_commit.submit(database, failing),
        group_commit.submit(database, queue.Settle("w1", now, [queue.delivered(copies[2], "b")])),
        return_exceptions=True,
    )
    assert [e.type for e in results[0]] == ["delivery.delivered"]  # type: ignore[union-attr]
    assert isinstance(results[1], Exception)
    assert [e.type for e in results[2]] == ["delivery.delivered"]  # type: ignore[union-attr]
    after = await states(database)
    assert after[copies[0].id][:3] == (DeliveryStatus.DELIVERED, 1, None)
    assert after[copies[2].id][:3] == (DeliveryStatus.DELIVERED, 1, None)
    # nothing of the failed unit: still held by w1, queued, no attempt, no event, no DSN
    assert after[copies[1].id][:3] == (DeliveryStatus.QUEUED, 0, "w1")
    assert dsn_copy.id not in after
    assert await journaled(database) == [
        ("delivery.delivered", copies[0].id),
        ("delivery.delivered", copies[2].id),
    ]
    # and the worker can still record it
    retried = await group_commit.submit(
        database, queue.Settle("w1", now, [queue.bounced(copies[1], "550 no", status="5.0.0")])
    )
    assert [e.type for e in retried if e] == ["delivery.bounced"]


async def test_a_bounce_in_a_batch_queues_its_dsn_only_where_the_copy_bounced_here(
    database: Database,
) -> None:
    now = utcnow()
    copies = await claimed_copies(database, 2, now)
    await take_over(database, copies[1], "w2", now + LEASE)
    dsns = [
        Message(
            id=new_id(), received_at=now, sender="", blob="1" * 64, size=1, message_id_header=""
        )
        for _ in copies
    ]
    dsn_copies = [new_delivery(m.id, "agent@example.com", m.blob, now, 3600) for m in dsns]
    await asyncio.gather(
        *(
            group_commit.submit(
                database,
                queue.Settle(
                    "w1", now, [queue.bounced(copy, "550", status="5.0.0")], [dsn, dsn_copy]
                ),
            )
            for copy, dsn, dsn_copy in zip(copies, dsns, dsn_copies, strict=True)
        )
    )
    after = await states(database)
    assert dsn_copies[0].id in after
    assert dsn_copies[1].id not in after


async def test_claimed_copies_and_messages_hold_what_the_orm_reads(database: Database) -> None:
    now = utcnow()
    (copy,) = await claimed_copies(database, 1, now)
    claimed = await group_commit.submit(
        database, queue.Claim("w1", now + timedelta(hours=1), LEASE, 1)
    )  # w1's lease ran out: claimed again, with its message
    assert [c.delivery.id for c in claimed] == [copy.id]
    async with database.transaction() as session:
        delivery = await session.get(Delivery, copy.id)
        message = await session.get(Message, copy.message_id)
        assert delivery is not None and message is not None
        for plain, loaded in ((claimed[0].delivery, delivery), (claimed[0].message, message)):
            for column in type(loaded).__table__.columns:
                assert getattr(plain, column.key) == getattr(loaded, column.key), column.key
    claimed[0].delivery.attempts += 1  # plain objects take changes as any transient one
    assert claimed[0].delivery.attempts == 1
