"""Migrated databases for the tests, made once per run instead of once per test.

Alembic spends tens of milliseconds of CPU on every upgrade (it loads each revision file and
builds its operations), and a few hundred database tests paid that each. Here the migrations
run once per backend; each test gets a copy of what they made: the SQLite file copied, and on
PostgreSQL the statements the migrations sent, replayed in the test's own schema. A relay
still runs `upgrade()` at its start, which finds its copy at the newest revision.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, event, text

from gateway.store.db import Database, make_engine

T = TypeVar("T")
# what the migrations sent to PostgreSQL, in order: (statement, driver parameters)
Statements = list[tuple[str, Any]]


def migrated_sqlite(directory: Path) -> Path:
    """A migrated SQLite file, whole: closing the engine checkpoints the WAL into it."""
    path = directory / "relay.db"

    async def migrate() -> None:
        db = Database.connect(f"sqlite+aiosqlite:///{path}")
        await db.upgrade()
        await db.close()

    _run_apart(migrate())
    assert not path.with_name(f"{path.name}-wal").exists(), "the template's WAL was not merged"
    return path


def copy_sqlite(template: Path, path: Path) -> None:
    shutil.copyfile(template, path)


def migration_statements(url: str) -> Statements:
    """What the migrations send to an empty PostgreSQL schema (made and dropped here)."""
    return _run_apart(_record_migrations(url))


async def replay(db: Database, statements: Statements) -> None:
    """The migrations' statements in `db`'s schema, in one transaction."""
    async with db.engine.begin() as connection:
        for statement, parameters in statements:
            await connection.exec_driver_sql(statement, parameters)


async def _record_migrations(url: str) -> Statements:
    schema = f"test_template_{secrets.token_hex(6)}"
    admin = make_engine(url)
    recorded: Statements = []

    def record(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        recorded.append((statement, parameters))

    try:
        async with admin.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {schema}"))
        db = Database.connect(url, schema=schema)
        event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        try:
            await db.upgrade()
        finally:
            await db.close()
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        await admin.dispose()
    return recorded


def _run_apart(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on an event loop of its own thread: the test's loop may be running already."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
