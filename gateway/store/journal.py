"""The journal: one append-only, hash-chained record of everything that happened.

Every other view (admin UI, API, webhooks) reads from here. Each event's hash covers its
content and the previous event's hash, so removing or changing one breaks the chain from
there on; `verify` finds the first such break.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import events
from gateway.store.db import Database
from gateway.store.events import NewEvent
from gateway.store.models import Event, JournalHead, utcnow

__all__ = [
    "ChainReport",
    "NewEvent",
    "append",
    "append_rows",
    "event_hash",
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
) -> list[Event]:
    """Add events inside the caller's transaction, each exactly as gateway/store/events.py
    declares it.

    Call it last before commit: it locks the chain head until the transaction ends.
    """
    if not new_events:
        return []
    for new in new_events:
        events.check(new)
    at = _as_stored(now or utcnow())
    head = (
        await session.execute(select(JournalHead).where(JournalHead.id == 1).with_for_update())
    ).scalar_one()
    rows = []
    for new in new_events:
        seq = head.seq + 1
        digest = event_hash(head.hash, seq, at, new.type, new.message_id, new.delivery_id, new.data)
        rows.append(
            Event(
                seq=seq,
                at=at,
                type=new.type,
                message_id=new.message_id,
                delivery_id=new.delivery_id,
                data=new.data,
                prev_hash=head.hash,
                hash=digest,
            )
        )
        head.seq, head.hash = seq, digest
    session.add_all(rows)
    return rows


def append_rows(
    connection: Connection, batches: Sequence[tuple[Sequence[NewEvent], datetime]]
) -> int:
    """`append` in SQLAlchemy Core for the group commit (gateway/store/group_commit.py): the
    events of many units, each list with its own time, chained in order with one read of the
    head, one executemany and one head update. The same rows and hashes as `append`, so
    `verify` cannot tell them apart. How many events it added.

    Call it last before commit, as `append`: it locks the chain head until the transaction
    ends.
    """
    pending = [(new, _as_stored(at)) for news, at in batches for new in news]
    if not pending:
        return 0
    for new, _at in pending:
        events.check(new)
    head = cast(Table, JournalHead.__table__)
    seq, prev_hash = connection.execute(
        select(head.c.seq, head.c.hash).where(head.c.id == 1).with_for_update()
    ).one()
    rows = []
    for new, at in pending:
        seq += 1
        digest = event_hash(prev_hash, seq, at, new.type, new.message_id, new.delivery_id, new.data)
        rows.append(
            {
                "seq": seq,
                "at": at,
                "type": new.type,
                "message_id": new.message_id,
                "delivery_id": new.delivery_id,
                "data": new.data,
                "prev_hash": prev_hash,
                "hash": digest,
            }
        )
        prev_hash = digest
    connection.execute(insert(cast(Table, Event.__table__)), rows)
    connection.execute(update(head).where(head.c.id == 1).values(seq=seq, hash=prev_hash))
    return len(rows)


def _as_stored(at: datetime) -> datetime:
    """Hash the time as it is stored, in UTC: `verify` recomputes from the stored value. (A
    naive time is refused when written, as in every UTC column.)"""
    return at.astimezone(UTC) if at.tzinfo is not None else at


@dataclass(frozen=True)
class ChainReport:
    events: int
    broken_at: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(session: AsyncSession) -> ChainReport:
    """Walk the chain in order up to the head read first, recomputing every hash.

    The head is read before the events: whatever the transaction's isolation, every event up
    to it was committed with it, and events appended while the walk runs lie beyond it.
    Callers should still pass a snapshot (`Database.snapshot`) so what they read beside the
    chain is of the same moment.
    """
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
                event.seq,
                event.at,
                event.type,
                event.message_id,
                event.delivery_id,
                event.data,
            )
            if digest != event.hash:
                return ChainReport(count, event.seq, "content does not match its hash")
            prev_hash, expected_seq, count = event.hash, expected_seq + 1, count + 1
        last_seq = batch[-1].seq
    if head.seq != count or head.hash != prev_hash:
        return ChainReport(
            count, count + 1, f"the chain ends at {count} but its head says {head.seq}"
        )
    return ChainReport(count)


async def verify_database(db: Database) -> ChainReport:
    """`verify` over one snapshot of `db`, blocking no writer: safe while mail flows."""
    async with db.snapshot() as session:
        return await verify(session)
