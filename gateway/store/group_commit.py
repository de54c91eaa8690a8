"""Group commit: one writer per database and event loop commits the work of many callers in
one short transaction, with one fsync.

A transaction per message cost a commit (an fsync on SQLite, a round trip and a WAL flush on
PostgreSQL) and the lock on the journal's head for as long as the caller's awaits took. Here a
caller hands in a *unit*: a plain function that does its writes on the connection it is given
(SQLAlchemy Core, no awaits) and returns `Done(result, events, at)`. The writer takes whatever
units are queued (up to `BATCH`), runs them one after another in one transaction (units of a
kind that can, together: the batch's holds, settles and intake rows in a statement or two
each), inserts all their journal events in one statement (`journal.append_rows`), commits,
answers each caller and wakes the journal's sequencer. Nothing awaits inside the open
transaction but the database call itself, so the transaction is as short as the SQL.

A unit that raises fails only itself: when a batch fails, the writer runs it again with a
SAVEPOINT around each unit, so the others commit and the bad one gets its own exception.
`Database.close()` lets the writers finish what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

from gateway.store import bulk, events, inline_blobs, journal, sqlite_thread
from gateway.store.db import Database
from gateway.store.events import NewEvent
from gateway.store.models import Base, utcnow

__all__ = ["BATCH", "Done", "Unit", "insert", "submit"]

log = logging.getLogger(__name__)

BATCH = 200  # units per transaction: enough to share a commit, short enough to keep it brief
LINGER = 0.010  # seconds a unit no client waits for may wait for others (submit)

T = TypeVar("T")


@dataclass(frozen=True)
class Done(Generic[T]):
    """What a unit did: its caller's `result`, and the journal `events` it adds, at `at`
    (the commit's time when None)."""

    result: T
    events: Sequence[NewEvent] = ()
    at: datetime | None = None


Unit = Callable[[Connection], Done[T]]


async def submit(db: Database, unit: Unit[T], *, linger: bool = False) -> T:
    """Run `unit` in the next group transaction; its result once that has committed.

    `linger`: the unit may wait up to LINGER for others to share its commit, when the
    writer finds only such units queued; the next unit that may not wait (a message whose
    client awaits its 250) takes them all along. Below saturation the writer is idle and
    each unit had a transaction of its own: a claim and an outcome cost a message two
    more transactions than its intake, each writing the same table and index pages again
    (bench/README.md). Raises what the unit raised (nothing of it is committed then), or
    the error of the commit itself.
    """
    return await _writer(db).put(unit, linger)  # type: ignore[no-any-return]


async def insert(
    db: Database,
    rows: Sequence[Base],
    new_events: Sequence[NewEvent],
    at: datetime,
    blobs: Mapping[str, bytes] | None = None,
) -> None:
    """INSERT `rows` (parents first, gateway/store/bulk.py) and journal `new_events`, durably;
    with `blobs` (digest -> bytes) stored in the same transaction (gateway/store/inline_blobs.py).
    """
    await submit(db, _Insert(rows, new_events, at, blobs or {}))


@dataclass(frozen=True)
class _Insert:
    """`insert` as a unit; the rows of every such unit in a batch go in together."""

    rows: Sequence[Base]
    events: Sequence[NewEvent]
    at: datetime
    blobs: Mapping[str, bytes]

    def __call__(self, connection: Connection) -> Done[None]:
        return _Insert.run_together(connection, [self])[0]

    @staticmethod
    def run_together(connection: Connection, inserts: Sequence[_Insert]) -> list[Done[None]]:
        inline_blobs.insert(
            connection,
            [(digest, data, unit.at) for unit in inserts for digest, data in unit.blobs.items()],
        )
        bulk.insert_rows(connection, [row for unit in inserts for row in unit.rows])
        return [Done(None, unit.events, unit.at) for unit in inserts]


@dataclass(frozen=True)
class _Item:
    unit: Unit[Any]
    future: asyncio.Future[Any]
    linger: bool = False


class _Writer:
    """The one writer of a database on one event loop."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self.closed = False
        # A context of its own: the first caller may be a prospect's visit, whose marks
        # (gateway/store/admission.py) the writer of everyone's work must not inherit.
        self.task = asyncio.create_task(
            self._run(), name="group-commit", context=contextvars.Context()
        )

    def put(self, unit: Unit[Any], linger: bool = False) -> asyncio.Future[Any]:
        if self.closed:
            raise RuntimeError("the database is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(unit, future, linger))
        return future

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self.closed = True
        self.queue.put_nowait(None)
        await self.task

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Item] = []
            stopping = self._take(batch, await self.queue.get())
            if not batch:
                continue
            try:
                if not stopping and all(item.linger for item in batch):
                    stopping = await self._linger(batch)
                await self._commit(batch)
            except BaseException as exc:  # cancelled: no caller may wait forever
                _fail(batch, exc if isinstance(exc, Exception) else RuntimeError("stopped"))
                raise

    def _take(self, batch: list[_Item], item: _Item | None) -> bool:
        """`item` and what else is queued into `batch`, up to BATCH; whether to stop."""
        while True:
            if item is None:
                return True
            if not item.future.cancelled():
                batch.append(item)
            if len(batch) >= BATCH or self.queue.empty():
                return False
            item = self.queue.get_nowait()

    async def _linger(self, batch: list[_Item]) -> bool:
        """Units into `batch` until one that may not wait comes or LINGER has passed; whether
        to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER):
                while len(batch) < BATCH:
                    taken = len(batch)
                    if self._take(batch, await self.queue.get()):
                        return True
                    if not all(queued.linger for queued in batch[taken:]):
                        break
        return False

    async def _commit(self, batch: list[_Item]) -> None:
        units = [item.unit for item in batch]
        try:
            results, journaled = await self._transaction(lambda c: _all_at_once(c, units))
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            log.info("a group of %d failed (%s); each unit again on its own", len(batch), exc)
            try:
                results, journaled = await self._transaction(lambda c: _each_on_its_own(c, units))
            except Exception as again:
                _fail(batch, again)
                return
        if journaled:
            self.db.journaled()
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def _transaction(
        self, work: Callable[[Connection], tuple[list[Any], int]]
    ) -> tuple[list[Any], int]:
        """One transaction around `work`: on SQLite whole on the driver's thread
        (gateway/store/sqlite_thread.py), on PostgreSQL through the async connection."""
        if self.db.is_postgres:
            async with self.db.engine.begin() as connection:
                return await connection.run_sync(work)
        async with self.db.engine.connect() as connection:
            return await sqlite_thread.run(connection, work)


def _all_at_once(connection: Connection, units: Sequence[Unit[Any]]) -> tuple[list[Any], int]:
    """The fast path: every unit, then every event, no savepoints. (Results, events added.)"""
    now = utcnow()
    done = _run(connection, units)
    journaled = journal.append_rows(connection, [(d.events, d.at or now) for d in done])
    return [d.result for d in done], journaled


def _run(connection: Connection, units: Sequence[Unit[Any]]) -> list[Done[Any]]:
    """Every unit, in the order given; units of a class with a `run_together` (a static
    method taking the connection and all of them) run in one call, at the place of the first.

    The callers of one batch wait for its commit together, so none has seen another's
    outcome: any order of their units is one they could have arrived in."""
    done: list[Done[Any] | None] = [None] * len(units)
    together: dict[type, list[int]] = {}
    steps: list[int | type] = []
    for index, unit in enumerate(units):
        kind = type(unit)
        if not hasattr(kind, "run_together"):
            steps.append(index)
        elif kind in together:
            together[kind].append(index)
        else:
            together[kind] = [index]
            steps.append(kind)
    for step in steps:
        if isinstance(step, int):
            done[step] = units[step](connection)
            continue
        indexes = together[step]
        results = step.run_together(connection, [units[i] for i in indexes])  # type: ignore[attr-defined]
        for index, result in zip(indexes, results, strict=True):
            done[index] = result
    return done  # type: ignore[return-value]


def _each_on_its_own(connection: Connection, units: Sequence[Unit[Any]]) -> tuple[list[Any], int]:
    """After a failed batch: each unit in a SAVEPOINT, so that a bad one is rolled back alone
    and answered with its own exception."""
    now = utcnow()
    results: list[Any] = []
    kept: list[Done[Any]] = []
    for unit in units:
        savepoint = connection.begin_nested()
        try:
            done = unit(connection)
            for new in done.events:
                events.check(new)
        except Exception as exc:
            savepoint.rollback()
            results.append(exc)
            continue
        savepoint.commit()
        kept.append(done)
        results.append(done.result)
    journaled = journal.append_rows(connection, [(d.events, d.at or now) for d in kept])
    return results, journaled


def _fail(batch: Sequence[_Item], exc: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


_writers: weakref.WeakKeyDictionary[Database, dict[asyncio.AbstractEventLoop, _Writer]] = (
    weakref.WeakKeyDictionary()
)


def _writer(db: Database) -> _Writer:
    loop = asyncio.get_running_loop()
    per_loop = _writers.get(db)
    if per_loop is None:
        per_loop = _writers[db] = {}
        # first of the close hooks: what is queued commits before anything else closes
        db.on_close.insert(0, lambda: _close(db))
    writer = per_loop.get(loop)
    if writer is None or writer.task.done():
        writer = per_loop[loop] = _Writer(db)
    return writer


async def _close(db: Database) -> None:
    """`Database.close`'s hook: drain this loop's writer; writers of loops gone are dropped."""
    per_loop = _writers.pop(db, {})
    loop = asyncio.get_running_loop()
    writer = per_loop.get(loop)
    if writer is not None and not writer.task.done():
        await writer.close()
