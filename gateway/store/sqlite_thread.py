"""Run a transaction of plain synchronous Core on SQLite's connection thread, in one hop.

Through the async driver every statement is several round trips between the event loop and
aiosqlite's thread (cursor, execute, fetch, close: about 28 per relayed message, each a
future, a queue put, a thread wake-up and a wake of the loop) plus greenlet switches. The
group commit's batch (gateway/store/group_commit.py) is synchronous Core with no awaits, so
it runs whole on that thread, through a synchronous SQLAlchemy connection over the same
sqlite3 connection: one hop per batch, and the statements' CPU off the event loop.

The async connection stays checked out for the whole call, so nothing else uses the sqlite3
connection meanwhile; the transaction opens with BEGIN IMMEDIATE as every write does
(gateway/store/db.py), waiting for another process's lock by polling it
(gateway/store/sqlite_lock.py), which can sleep here: this is the driver's thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import StaticPool

from gateway.store.sqlite_lock import begin_write

__all__ = ["SETTLED", "run"]

T = TypeVar("T")

_SNAPSHOT = "sealrelay_thread_snapshot"
# in a pooled connection's `info`: its transaction was ended on the thread (gateway/store/db.py)
SETTLED = "sealrelay_thread_settled"

# one synchronous engine per aiosqlite connection, over its sqlite3 connection
_engines: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()


async def run(
    connection: AsyncConnection, work: Callable[[Connection], T], *, snapshot: bool = False
) -> T:
    """`work(sync_connection)` in one transaction on `connection`'s SQLite thread; committed
    when it returns, rolled back when it raises (the exception comes through). `snapshot`:
    a deferred read transaction (plain BEGIN, which in WAL blocks no writer) for work that
    only reads."""
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # the aiosqlite.Connection
    engine = _engines.get(driver)
    if engine is None:
        engine = _engines[driver] = _engine_over(driver)
    # aiosqlite's queue of calls for its thread; SQLAlchemy's own adapter uses it as well
    result: T = await driver._execute(_transaction, engine, work, snapshot)
    # ended on the thread: the pool's ROLLBACK on return, one more hop, has nothing to do
    raw.info[SETTLED] = True
    return result


def _transaction(engine: Engine, work: Callable[[Connection], T], snapshot: bool) -> T:
    with engine.connect() as connection:
        if snapshot:
            connection.execution_options(**{_SNAPSHOT: True})
        with connection.begin():
            return work(connection)


def _engine_over(driver: Any) -> Engine:
    sqlite = driver._conn
    engine = create_engine(
        "sqlite://",
        creator=lambda: sqlite,
        poolclass=StaticPool,
        pool_reset_on_return=None,
    )

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_SNAPSHOT):
            connection.exec_driver_sql("BEGIN")
        else:
            begin_write(sqlite)  # polled: see gateway/store/sqlite_lock.py

    return engine
