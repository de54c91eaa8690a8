"""A test's database copied from the run's template is what running the migrations makes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import Connection, inspect, select, text

from gateway.store.db import Database, make_engine
from gateway.store.models import JournalHead
from tests.conftest import POSTGRES_URL


def _tables(connection: Connection) -> dict[str, list[str]]:
    found = inspect(connection)
    return {
        table: sorted(
            [f"{c['name']} {c['type']} {c['nullable']}" for c in found.get_columns(table)]
            + [f"index {i['name']} {i['column_names']}" for i in found.get_indexes(table)]
            + [f"unique {u['column_names']}" for u in found.get_unique_constraints(table)]
            + [f"fk {f['constrained_columns']}" for f in found.get_foreign_keys(table)]
        )
        for table in found.get_table_names()
    }


@asynccontextmanager
async def migrated_here(like: Database, tmp_path: Path) -> AsyncIterator[Database]:
    """A database of `like`'s backend, migrated by alembic now."""
    if not like.is_postgres:
        db = Database.connect(f"sqlite+aiosqlite:///{tmp_path}/migrated.db")
        await db.upgrade()
        yield db
        await db.close()
        return
    schema = f"test_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    db = Database.connect(POSTGRES_URL, schema=schema)
    try:
        await db.upgrade()
        yield db
    finally:
        await db.close()
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


async def test_a_copied_database_is_a_migrated_one(database: Database, tmp_path: Path) -> None:
    current, newest = await database.schema_revisions()
    assert current == newest
    async with database.transaction() as session:
        head = (await session.scalars(select(JournalHead))).one()
    assert (head.seq, head.hash) == (0, "0" * 64)

    async with (
        migrated_here(database, tmp_path) as migrated,
        migrated.engine.connect() as connection,
    ):
        expected = await connection.run_sync(_tables)
    async with database.engine.connect() as connection:
        assert await connection.run_sync(_tables) == expected
