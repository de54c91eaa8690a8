"""Migrations against real databases: the newest schema is what the models declare, and
data written under an older schema survives the upgrade with its meaning."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from gateway.store import journal
from gateway.store.db import MIGRATIONS, Database
from gateway.store.events import BLOBS_DELETED
from gateway.store.models import Base
from gateway.store.search_indexes import include_object
from gateway.store.sequencer import chain_all


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade_to(connection: Connection, revision: str) -> None:
    command.upgrade(_config(connection), revision)


def _downgrade_to(connection: Connection, revision: str) -> None:
    command.downgrade(_config(connection), revision)


def _differences(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"include_object": include_object})
    return list(compare_metadata(context, Base.metadata))


async def test_the_newest_schema_is_what_the_models_declare(database_url: str) -> None:
    db = Database.connect(database_url)
    try:
        await db.upgrade()
        async with db.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await db.close()


async def test_admins_keep_their_role_across_the_roles_migration(database_url: str) -> None:
    db = Database.connect(database_url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "0003")
            await connection.execute(
                text(
                    "INSERT INTO users (email, password_hash, is_admin, disabled, created_at)"
                    " VALUES ('it@broker.example', 'x', true, false, CURRENT_TIMESTAMP),"
                    " ('anna@broker.example', 'x', false, false, CURRENT_TIMESTAMP)"
                )
            )
        await db.upgrade()
        async with db.engine.connect() as connection:
            roles = dict((await connection.execute(text("SELECT email, role FROM users"))).all())
            cursor = (await connection.execute(text("SELECT id, seq FROM webhook_cursor"))).all()
        assert roles == {"it@broker.example": "admin", "anna@broker.example": "agent"}
        assert cursor == [(1, 0)]
    finally:
        await db.close()


async def test_the_journal_keeps_its_chain_across_the_sequencer_migration(
    database_url: str,
) -> None:
    """Events chained under the head lock (0012) keep seq and hashes and get id = seq; new
    events, written bare, continue the same chain once the sequencer ran."""
    db = Database.connect(database_url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "0012_agent_logins")
        prev, at = journal.GENESIS, datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
        async with db.engine.begin() as connection:
            for seq in (1, 2, 3):
                data = {"count": seq, "bytes": 0}
                digest = journal.event_hash(prev, seq, at, "blobs.deleted", None, None, data)
                await connection.execute(
                    text(
                        "INSERT INTO events (seq, at, type, data, prev_hash, hash)"
                        " VALUES (:seq, :at, 'blobs.deleted', :data, :prev, :hash)"
                    ),
                    {
                        "seq": seq,
                        "at": at.replace(tzinfo=None) if not db.is_postgres else at,
                        "data": json.dumps(data),
                        "prev": prev,
                        "hash": digest,
                    },
                )
                prev = digest
            await connection.execute(
                text("UPDATE journal_head SET seq = 3, hash = :hash"), {"hash": prev}
            )
        await db.upgrade()
        async with db.engine.connect() as connection:
            rows = (await connection.execute(text("SELECT id, seq FROM events ORDER BY id"))).all()
        assert [tuple(row) for row in rows] == [(1, 1), (2, 2), (3, 3)]
        assert await journal.verify_database(db) == journal.ChainReport(3)
        async with db.transaction() as session:
            ids = await journal.append(session, [BLOBS_DELETED.new({"count": 4, "bytes": 0})])
        assert ids == [4]
        await chain_all(db)
        assert await journal.verify_database(db) == journal.ChainReport(4)
    finally:
        await db.close()


def _compression(connection: Connection) -> str | None:
    """How PostgreSQL compresses inline blobs written now: 'l' lz4, '' the server's default;
    None on SQLite, which has no such setting."""
    if connection.dialect.name != "postgresql":
        return None
    return connection.scalar(
        text(
            "SELECT attcompression::text FROM pg_attribute"
            " WHERE attrelid = 'inline_blobs'::regclass AND attname = 'data'"
        )
    )


async def test_inline_blobs_are_compressed_with_lz4_on_postgresql(database_url: str) -> None:
    """This machine's PostgreSQL has lz4 (Debian's is built with it): the test says so rather
    than pass on a server that would keep pglz."""
    db = Database.connect(database_url)
    try:
        await db.upgrade()
        async with db.engine.begin() as connection:
            expected = None if not db.is_postgres else "l"
            assert await connection.run_sync(_compression) == expected
            await connection.run_sync(_downgrade_to, "0016_sender_name")
            assert await connection.run_sync(_compression) == (None if not db.is_postgres else "")
            await connection.run_sync(_upgrade_to, "head")
            assert await connection.run_sync(_compression) == expected
            await connection.execute(
                text(
                    "INSERT INTO inline_blobs (digest, size, written_at, data)"
                    " VALUES ('d', 3, CURRENT_TIMESTAMP, :data)"
                ),
                {"data": b"abc" * 4000},
            )
            stored = await connection.scalar(text("SELECT data FROM inline_blobs"))
        assert stored == b"abc" * 4000
    finally:
        await db.close()


def _event_indexes(connection: Connection) -> set[str]:
    return {index["name"] or "" for index in inspect(connection).get_indexes("events")}


def _message_lookup_plan(connection: Connection) -> str:
    """How the database reads a message's events in order (the timeline's query)."""
    sql = "SELECT id FROM events WHERE message_id = 'm' ORDER BY id"
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET LOCAL enable_seqscan = off"))  # an empty table
        rows = connection.execute(text(f"EXPLAIN {sql}"))
        return "\n".join(str(row[0]) for row in rows)
    return "\n".join(str(row[-1]) for row in connection.execute(text(f"EXPLAIN QUERY PLAN {sql}")))


async def test_events_keep_one_index_by_message(database_url: str) -> None:
    """ix_events_message_order answers lookups by message; the single-column index it made
    redundant goes, and comes back on a downgrade."""
    db = Database.connect(database_url)
    try:
        await db.upgrade()
        async with db.engine.begin() as connection:
            indexes = await connection.run_sync(_event_indexes)
            assert "ix_events_message_order" in indexes
            assert "ix_events_message_id" not in indexes
            assert "ix_events_message_order" in await connection.run_sync(_message_lookup_plan)
            await connection.run_sync(_downgrade_to, "0017_inline_blobs_lz4")
            assert "ix_events_message_id" in await connection.run_sync(_event_indexes)
            await connection.run_sync(_upgrade_to, "head")
            assert "ix_events_message_id" not in await connection.run_sync(_event_indexes)
    finally:
        await db.close()
