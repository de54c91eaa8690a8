"""Processes that start on a new database at the same moment (hosts started together, or
`serve` and a CLI command) all get it, migrated once.

SQLite: each connection switches the database to WAL. While another process is creating the
file, SQLite can refuse that switch at once instead of waiting in its busy handler: two CLI
commands started together hit it (one exited 1 with "database is locked"). It is a race, so
the test runs many rounds of it; without the retry it failed about one run in four.

PostgreSQL: two migrations at once both created the first table, and the second failed;
without the lock this test failed every time.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path

from sqlalchemy import text

from gateway.store.db import Database, make_engine
from tests.conftest import POSTGRES_URL

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


def _migrate_each(
    schemas: list[str], barrier: Barrier, failures: multiprocessing.Queue[str]
) -> None:
    async def migrate(schema: str) -> None:
        database = Database.connect(POSTGRES_URL, schema=schema)
        try:
            await database.upgrade()
            current, newest = await database.schema_revisions()
            assert current == newest, (current, newest)
        finally:
            await database.close()

    for schema in schemas:
        barrier.wait(timeout=60)
        try:
            asyncio.run(migrate(schema))
        except Exception as error:  # reported to the test
            failures.put(f"{schema}: {error!r}")


def _all_at_once(target: Callable[..., None], argument: object) -> list[str]:
    """`target(argument, barrier, failures)` in PROCESSES processes; what failed."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    failures: multiprocessing.Queue[str] = context.Queue()
    workers = [
        context.Process(target=target, args=(argument, barrier, failures)) for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
        assert worker.exitcode == 0
    found = []
    while not failures.empty():
        found.append(failures.get())
    return found


def test_processes_opening_a_new_sqlite_database_at_once_all_connect(tmp_path: Path) -> None:
    assert _all_at_once(_open_each, str(tmp_path)) == []


async def test_processes_migrating_a_new_postgresql_database_at_once_all_succeed() -> None:
    schemas = [f"test_start_{secrets.token_hex(6)}" for _ in range(2)]
    admin = make_engine(POSTGRES_URL)
    try:
        async with admin.begin() as connection:
            for schema in schemas:
                await connection.execute(text(f"CREATE SCHEMA {schema}"))
        assert await asyncio.to_thread(_all_at_once, _migrate_each, schemas) == []
    finally:
        async with admin.begin() as connection:
            for schema in schemas:
                await connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        await admin.dispose()
