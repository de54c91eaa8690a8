"""The journal: one append-only, hash-chained record of everything that happened.

Every other view (admin UI, API, webhooks) reads from here. Each event's hash covers its
content and the previous event's hash, so removing or changing one breaks the chain from
there on; `verify` finds the first such break.

Writers insert events bare; the sequencer (gateway/store/sequencer.py) numbers and chains
them shortly after. `verify` proves the chain and says how many events still wait for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import events
from gateway.store.db import JOURNALED, Database
from gateway.store.events import NewEvent
from gateway.store.models import Event, JournalHead, utcnow
from gateway.store.raw_sql import RawStatement

__all__ = [
    "ChainReport",
    "Lag",
    "NewEvent",
    "append",
    "append_rows",
    "event_hash",
    "seq_of",
    "verify",
    "verify_database",
]

GENESIS = "0" * 64
VERIFY_BATCH = 1000


def event_hash(
    prev_hash: str,
    seq: int,
    at: datetime,
    type_: str,
    message_id: str | None,
    delivery_id: str | None,
    data: dict[str, Any],
) -> str:
    body = json.dumps(
        [seq, at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), type_, message_id, delivery_id, data],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


async def append(
    session: AsyncSession, new_events: Sequence[NewEvent], now: datetime | None = None
) -> list[int]:
    """Add events inside the caller's transaction, each exactly as gateway/store/events.py
    declares it; their row ids, in order.

    They are inserted unnumbered and unchained: no lock is taken but the new rows' own, so
    writers do not queue behind one another. The sequencer numbers and chains them shortly
    after the commit (gateway/store/sequencer.py); `Database.transaction` wakes it.
    """
    if not new_events:
        return []
    for new in new_events:
        events.check(new)
    at = _as_stored(now or utcnow())
    rows = [_row(new, at) for new in new_events]
    table = _events()
    ids = await session.scalars(
        insert(table).returning(table.c.id, sort_by_parameter_order=True), rows
    )
    session.info[JOURNALED] = True
    return list(ids)


def append_rows(
    connection: Connection, batches: Sequence[tuple[Sequence[NewEvent], datetime]]
) -> int:
    """`append` on a plain connection for the group commit (gateway/store/group_commit.py): the
    events of many units, each list with its own time, in one executemany. The same rows as
    `append`. How many events it added; the caller wakes the sequencer after its commit.
    """
    pending = [(new, _as_stored(at)) for news, at in batches for new in news]
    if not pending:
        return 0
    for new, _at in pending:
        events.check(new)
    _insert_events().executemany(connection, [_row(new, at) for new, at in pending])
    return len(pending)


@functools.cache
def _insert_events() -> RawStatement:
    """The events' INSERT, compiled once and run on the driver's cursor
    (gateway/store/raw_sql.py)."""
    return RawStatement(insert(_events()), ("at", "type", "message_id", "delivery_id", "data"))


def seq_of(event: Event) -> int:
    """The seq of an event read from the chained journal (by `seq`): readers of the chain
    never meet an unchained event, and this says so to the type checker."""
    if event.seq is None:
        raise ValueError(f"event {event.id} is not chained yet")
    return event.seq


def _row(new: NewEvent, at: datetime) -> dict[str, Any]:
    return {
        "at": at,
        "type": new.type,
        "message_id": new.message_id,
        "delivery_id": new.delivery_id,
        "data": new.data,
    }


def _events() -> Table:
    return cast(Table, Event.__table__)


def _as_stored(at: datetime) -> datetime:
    """Hash the time as it is stored, in UTC: `verify` recomputes from the stored value. (A
    naive time is refused when written, as in every UTC column.)"""
    return at.astimezone(UTC) if at.tzinfo is not None else at


@dataclass(frozen=True)
class Lag:
    """The events written but not chained yet, and when the oldest of them was written."""

    unchained: int = 0
    oldest: datetime | None = None

    def age(self, now: datetime) -> float:
        """Seconds the oldest unchained event has waited; 0 when none waits."""
        return max(0.0, (now - self.oldest).total_seconds()) if self.oldest else 0.0


@dataclass(frozen=True)
class ChainReport:
    events: int
    broken_at: int | None = None
    reason: str = ""
    lag: Lag = Lag()

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(session: AsyncSession) -> ChainReport:
    """Walk the chain in order up to the head read first, recomputing every hash.

    The head is read before the events: whatever the transaction's isolation, every event up
    to it was committed with it, and events appended while the walk runs lie beyond it.
    Callers should still pass a snapshot (`Database.snapshot`) so what they read beside the
    chain is of the same moment. Events not chained yet are no part of the walk: the report
    counts them (`lag`).
    """
    report = await _walk(session)
    return replace(report, lag=await lag(session))


async def lag(session: AsyncSession) -> Lag:
    """How far the sequencer is behind: the unchained events, and the oldest one's time."""
    count, oldest = (
        await session.execute(select(func.count(), func.min(Event.at)).where(Event.seq.is_(None)))
    ).one()
    return Lag(int(count), oldest)


async def _walk(session: AsyncSession) -> ChainReport:
    head = (await session.execute(select(JournalHead).where(JournalHead.id == 1))).scalar_one()
    prev_hash, expected_seq, count = GENESIS, 1, 0
    last_seq = 0
    while last_seq < head.seq:
        batch = (
            (
                await session.execute(
                    select(Event)
                    .where(Event.seq > last_seq, Event.seq <= head.seq)
                    .order_by(Event.seq)
                    .limit(VERIFY_BATCH)
                )
            )
            .scalars()
            .all()
        )
        if not batch:
            break
        for event in batch:
            if event.seq != expected_seq:
                return ChainReport(count, expected_seq, f"event {expected_seq} is missing")
            if event.prev_hash != prev_hash:
                return ChainReport(count, event.seq, "does not link to the event before it")
            digest = event_hash(
                prev_hash,
                expected_seq,
                event.at,
                event.type,
                event.message_id,
                event.delivery_id,
                event.data,
            )
            if digest != event.hash:
                return ChainReport(count, event.seq, "content does not match its hash")
            prev_hash, expected_seq, count = digest, expected_seq + 1, count + 1
        last_seq = expected_seq - 1
    if head.seq != count or head.hash != prev_hash:
        return ChainReport(
            count, count + 1, f"the chain ends at {count} but its head says {head.seq}"
        )
    return ChainReport(count)


async def verify_database(db: Database) -> ChainReport:
    """`verify` over one snapshot of `db`, blocking no writer: safe while mail flows."""
    async with db.snapshot() as session:
        return await verify(session)
