"""bench/prefill.py leaves a database as one in service: migrated, every message delivered
and its events chained, and on PostgreSQL analyzed (which the relay's claim depends on)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.prefill import prefill
from gateway.store.db import Database

COUNT = 50


async def test_it_fills_a_database_as_the_relay_would(database_url: str) -> None:
    await prefill(database_url, COUNT)
    db = Database.connect(database_url)
    try:
        current, newest = await db.schema_revisions()
        assert current == newest
    finally:
        await db.close()
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            statuses = (
                await connection.execute(
                    text("SELECT status, count(*) FROM deliveries GROUP BY status")
                )
            ).all()
            assert [tuple(row) for row in statuses] == [("delivered", COUNT)]
            blobs = await connection.scalar(text("SELECT count(DISTINCT digest) FROM inline_blobs"))
            assert blobs == COUNT  # each message its own bytes
            unchained = await connection.scalar(
                text("SELECT count(*) FROM events WHERE seq IS NULL")
            )
            assert unchained == 0
            assert await connection.scalar(text("SELECT seq FROM journal_head")) == 3 * COUNT
            if connection.dialect.name == "postgresql":
                analyzed = await connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NULL"
                        " AND relname IN ('messages', 'deliveries', 'events')"
                    )
                )
                assert analyzed == 0
    finally:
        await engine.dispose()


async def test_nothing_to_fill_only_migrates(database_url: str) -> None:
    await prefill(database_url, 0)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT count(*) FROM messages")) == 0
    finally:
        await engine.dispose()
