"""BEGIN IMMEDIATE polled for another connection's write lock, on a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import sqlite_lock
from gateway.store.sqlite_lock import (
    FAST_POLL,
    FAST_TRIES,
    SLOW_POLL,
    SQLITE_BUSY_TIMEOUT_MS,
    begin_immediate,
)


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level None: transactions are begun by hand, as the relay's connections do
    connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    return connection


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    """Two connections to one file, as two relay processes have: `holder` and `waiter`."""
    path = tmp_path / "relay.db"
    holder, waiter = connect(path), connect(path)
    holder.execute("PRAGMA busy_timeout=0")  # the holder never waits
    holder.execute("CREATE TABLE t (x)")
    yield holder, waiter
    holder.close()
    waiter.close()


def busy_timeout(connection: sqlite3.Connection) -> int:
    (value,) = connection.execute("PRAGMA busy_timeout").fetchone()
    return int(value)


def release_after(
    holder: sqlite3.Connection, tries: int, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """The waiter's pauses, in place of sleeping; the holder commits at the `tries`th."""
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == tries:
            holder.execute("INSERT INTO t VALUES (1)")
            holder.execute("COMMIT")

    monkeypatch.setattr(sqlite_lock, "sleep", pause)
    return pauses


def test_the_lock_is_taken_as_soon_as_it_is_free(
    pair: tuple[sqlite3.Connection, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, waiter = pair
    holder.execute("BEGIN IMMEDIATE")
    pauses = release_after(holder, 3, monkeypatch)

    begin_immediate(waiter)

    assert pauses == [FAST_POLL] * 3
    assert waiter.in_transaction
    assert waiter.execute("SELECT count(*) FROM t").fetchone() == (1,)  # after the commit
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        holder.execute("BEGIN IMMEDIATE")  # the waiter holds it now
    assert busy_timeout(waiter) == SQLITE_BUSY_TIMEOUT_MS
    waiter.execute("COMMIT")


def test_a_long_holder_is_tried_less_often(
    pair: tuple[sqlite3.Connection, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, waiter = pair
    holder.execute("BEGIN IMMEDIATE")
    pauses = release_after(holder, FAST_TRIES + 5, monkeypatch)

    begin_immediate(waiter)

    assert pauses == [FAST_POLL] * (FAST_TRIES - 1) + [SLOW_POLL] * 6
    assert waiter.in_transaction
    waiter.execute("COMMIT")


def test_a_lock_held_past_the_timeout_is_database_is_locked(
    pair: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    holder, waiter = pair
    holder.execute("BEGIN IMMEDIATE")

    with pytest.raises(sqlite3.OperationalError, match="database is locked") as raised:
        begin_immediate(waiter, timeout_ms=30)

    assert raised.value.sqlite_errorcode == sqlite3.SQLITE_BUSY
    assert not waiter.in_transaction
    assert busy_timeout(waiter) == 30  # the bound it was given, for what it runs next
    holder.execute("COMMIT")
    begin_immediate(waiter)  # free again: at once
    waiter.execute("COMMIT")


def test_an_error_other_than_busy_is_not_waited_on(
    pair: tuple[sqlite3.Connection, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, waiter = pair
    pauses = release_after(waiter, 1, monkeypatch)
    waiter.execute("BEGIN")

    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        begin_immediate(waiter)

    assert pauses == []
    assert busy_timeout(waiter) == SQLITE_BUSY_TIMEOUT_MS
    waiter.execute("ROLLBACK")
