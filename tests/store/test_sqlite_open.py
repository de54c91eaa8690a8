"""Processes that open a new SQLite database at the same moment all get a connection.

Each connection switches the database to WAL. While another process is creating the file,
SQLite can refuse that switch at once instead of waiting in its busy handler: two CLI
commands started together hit it (one exited 1 with "database is locked"). It is a race, so
the test runs many rounds of it; without the retry it failed about one run in four.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

from sqlalchemy import text

from gateway.store.db import Database

ROUNDS = 80
PROCESSES = 3


def _open_each(directory: str, barrier: Barrier, failures: multiprocessing.Queue[str]) -> None:
    async def open_one(path: Path) -> None:
        """As the CLI does: each creates the schema if it is not there, in a write
        transaction that the others' first connections meet."""
        database = Database.connect(f"sqlite+aiosqlite:///{path}")
        try:
            async with database.transaction() as session:
                await session.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))
                await session.execute(text("INSERT INTO t VALUES (1)"))
            async with database.transaction() as session:
                assert (await session.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        finally:
            await database.close()

    for round_ in range(ROUNDS):
        barrier.wait(timeout=30)
        try:
            asyncio.run(open_one(Path(directory) / f"relay-{round_}.db"))
        except Exception as error:  # reported to the test
            failures.put(f"round {round_}: {error!r}")


def test_processes_opening_a_new_database_at_once_all_connect(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    failures: multiprocessing.Queue[str] = context.Queue()
    workers = [
        context.Process(target=_open_each, args=(str(tmp_path), barrier, failures))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert found == []
