"""SQLite's write lock, taken by polling it every half millisecond instead of in SQLite's
busy handler.

Every write transaction begins with BEGIN IMMEDIATE (gateway/store/db.py). When another
process holds the file's write lock (`serve --processes 2` on one SQLite file: the other
process's group commit, a few milliseconds), SQLite's busy handler sleeps 1, 2, 5, 10, 15,
20, 25 ms ... between tries, so a writer slept well past the moment the lock came free, and
that sleeping was most of the p99 time to 250 with two processes (bench/README.md). Here the
lock is tried again every half millisecond for the first 20 ms, then every 5 ms (a long
holder: a CLI command, a checkpoint), within the busy handler's bound.

Every write takes the lock so, on aiosqlite's thread, where waiting may sleep: the group
commit's and the journal sequencer's batches (gateway/store/sqlite_thread.py) and the ORM's
transactions (gateway/store/db.py).
"""

from __future__ import annotations

import sqlite3
from time import monotonic, sleep

from sqlalchemy.exc import DBAPIError

SQLITE_BUSY_TIMEOUT_MS = 30_000
FAST_POLL = 0.0005  # seconds between tries while another process's transaction ends
FAST_TRIES = 40  # about 20 ms of fast tries
SLOW_POLL = 0.005


def begin_immediate(sqlite: sqlite3.Connection, timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """BEGIN IMMEDIATE on `sqlite`, waiting up to `timeout_ms` for the write lock; then the
    connection's busy timeout is `timeout_ms` again, for everything else it runs. Raises
    sqlite3.OperationalError ("database is locked") when the lock stays held that long."""
    sqlite.execute("PRAGMA busy_timeout=0")
    try:
        deadline = monotonic() + timeout_ms / 1000
        tries = 0
        while True:
            try:
                sqlite.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # BUSY_RECOVERY too
                if not busy or monotonic() >= deadline:
                    raise
            tries += 1
            sleep(FAST_POLL if tries < FAST_TRIES else SLOW_POLL)
    finally:
        sqlite.execute(f"PRAGMA busy_timeout={timeout_ms}")


def begin_write(sqlite: sqlite3.Connection) -> None:
    """begin_immediate() for an engine's "begin" event, its errors raised as SQLAlchemy's
    (`sqlalchemy.exc.OperationalError` for a lock held too long), as a BEGIN IMMEDIATE run
    through the engine raised them: callers take those for a database they cannot use now."""
    try:
        begin_immediate(sqlite, SQLITE_BUSY_TIMEOUT_MS)
    except sqlite3.Error as exc:
        raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc
