"""The journal's sequencer: numbers and hash-chains the events that writers inserted bare.

Writers (`journal.append`, `journal.append_rows`) only insert rows; none of them waits for
another. Here one short transaction at a time locks the chain's head row, takes up to `BATCH`
unchained events in id order, gives them the next sequence numbers and hashes (exactly
`journal.event_hash`, so `verify` proves what it always did), and moves the head. The head
row serializes sequencers, not writers: on PostgreSQL a background pass takes it with
`FOR UPDATE SKIP LOCKED` and leaves the work to whichever process holds it; on SQLite the
write lock (BEGIN IMMEDIATE) does the same.

Because every pass commits its numbers together with the head, and passes run one after
another, an event's seq is visible only once every lower seq is: readers that continue after
the last seq they saw (the API feed, webhooks, notices) miss nothing and see nothing twice.

The time bound: while a relay runs, an event is chained within `database.chain_interval`
plus one pass after its commit (within `GATHER` plus a pass when its own process committed
it); events left unchained by a crash are chained by the first pass of the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import cast

from sqlalchemy import Connection, Integer, Table, bindparam, select, update

from gateway.store import loop_events, sqlite_thread
from gateway.store.db import Database
from gateway.store.journal import event_hash
from gateway.store.models import Event, JournalHead
from gateway.store.raw_sql import RawStatement

__all__ = ["BATCH", "Sequencer", "chain_all", "chain_pass", "chained_seq"]

log = logging.getLogger(__name__)

BATCH = 1000  # events per pass: a few milliseconds of hashing, one short transaction
BUSY_RETRY = 0.05  # seconds before trying again when another process's pass holds the head
# seconds a woken sequencer lets further commits gather before its pass: under load one pass
# (one more transaction, on SQLite one more fsync) then serves many group commits
GATHER = 0.1


async def chain_pass(db: Database, *, wait: bool = False, limit: int = BATCH) -> int | None:
    """Chain up to `limit` events in one transaction; how many. None when another
    sequencer holds the head and `wait` is False: it chains them instead."""
    if db.is_postgres:
        async with db.engine.begin() as connection:
            return await connection.run_sync(_chain, limit, wait)
    # whole on the driver's thread, as the group commit's batches: one hop per pass, the
    # hashing off the event loop
    async with db.engine.connect() as connection:
        return await sqlite_thread.run(connection, lambda sync: _chain(sync, limit, wait))


async def chain_all(db: Database) -> int:
    """Chain every event committed so far, waiting for another sequencer's pass if need be;
    how many this call chained. For shutdown, the command line, and tests."""
    total = 0
    while True:
        chained = await chain_pass(db, wait=True) or 0
        total += chained
        if chained < BATCH:
            return total


async def chained_seq(db: Database, event_id: int) -> int:
    """The seq of the committed event `event_id`, chaining it now if no pass has yet: for
    the few callers that must name the event by its seq at once (a webhook test)."""
    await chain_all(db)
    async with db.snapshot() as session:
        seq = await session.scalar(select(Event.seq).where(Event.id == event_id))
    if seq is None:
        raise LookupError(f"event {event_id} is not in the journal")
    return seq


def _chain(connection: Connection, limit: int, wait: bool) -> int | None:
    head, pending_events, number, move_head = _statements(wait)
    found = head.rows(connection, {})
    if not found:
        return None
    ((seq, prev_hash),) = found
    pending = pending_events.rows(connection, {"limit": limit})
    if not pending:
        return 0
    chained = []
    for row_id, at, type_, message_id, delivery_id, data in pending:
        seq += 1
        digest = event_hash(prev_hash, seq, at, type_, message_id, delivery_id, data)
        chained.append({"row": row_id, "new_seq": seq, "new_prev": prev_hash, "new_hash": digest})
        prev_hash = digest
    number.executemany(connection, chained)
    move_head.execute(connection, {"new_seq": seq, "new_hash": prev_hash})
    return len(chained)


@functools.cache
def _statements(wait: bool) -> tuple[RawStatement, RawStatement, RawStatement, RawStatement]:
    """A pass's four statements, compiled once and run on the driver's cursor
    (gateway/store/raw_sql.py): read and lock the head, read the unchained events in id
    order, number and chain them, move the head."""
    head = cast(Table, JournalHead.__table__)
    events = cast(Table, Event.__table__)
    return (
        RawStatement(
            select(head.c.seq, head.c.hash)
            .where(head.c.id == 1)
            .with_for_update(skip_locked=not wait)
        ),
        RawStatement(
            select(
                events.c.id,
                events.c.at,
                events.c.type,
                events.c.message_id,
                events.c.delivery_id,
                events.c.data,
            )
            .where(events.c.seq.is_(None))
            .order_by(events.c.id)
            .limit(bindparam("limit", type_=Integer()))
        ),
        RawStatement(
            update(events)
            .where(events.c.id == bindparam("row"))
            .values(
                seq=bindparam("new_seq"),
                prev_hash=bindparam("new_prev"),
                hash=bindparam("new_hash"),
            ),
            keys=(),
        ),
        RawStatement(
            update(head)
            .where(head.c.id == 1)
            .values(seq=bindparam("new_seq", type_=head.c.seq.type), hash=bindparam("new_hash")),
            keys=(),
        ),
    )


class Sequencer:
    """The background sequencer of one process: a pass whenever this process commits events,
    and at least every `interval` seconds for other processes' events.

    `start` registers it with the database; `Database.close` stops it after the group
    commit has drained and chains whatever is left, so a clean stop leaves nothing unchained.
    """

    def __init__(self, db: Database, interval: float = 1.0) -> None:
        self.db = db
        self.interval = interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="journal-sequencer")
        self.db.on_journaled.append(self.wake)
        self.db.on_close.append(self.close)

    def wake(self) -> None:
        """Run a pass soon: events were committed. Safe from another thread."""
        if self._loop is not None:
            loop_events.set_in(self._loop, self._wake)

    async def close(self) -> None:
        """Stop the background passes, then chain what is left."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        with contextlib.suppress(ValueError):
            self.db.on_journaled.remove(self.wake)
        try:
            await chain_all(self.db)
        except Exception:
            log.exception("journal sequencer: chaining at stop failed; the next start does it")

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            pause = self.interval
            try:
                while (chained := await chain_pass(self.db)) == BATCH:
                    pass
                if chained is None:
                    pause = min(BUSY_RETRY, self.interval)
            except Exception:
                log.exception("journal sequencer: a pass failed; trying again")
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()
                    await asyncio.sleep(min(GATHER, self.interval))
