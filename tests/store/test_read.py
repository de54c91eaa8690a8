"""`Database.read`: a visit's lookup as synchronous Core in one read transaction, run in one
go (on SQLite's thread, or one greenlet on PostgreSQL). What it read is what is committed;
what it raises comes through; either way the connection goes back to the pool with no
transaction open, though on SQLite the pool's rollback on return is left out after it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, text

from gateway.store.db import Database
from gateway.store.models import Message, MessageKind, new_id

AT = datetime(2026, 12, 3, 17, 20, tzinfo=UTC)


def subjects(connection: Connection) -> list[str]:
    return [row[0] for row in connection.execute(select(Message.subject).order_by(Message.id))]


async def add_message(database: Database, subject: str) -> None:
    async with database.transaction() as session:
        session.add(
            Message(
                id=new_id(),
                kind=MessageKind.BOUNCE,
                received_at=AT,
                sender="agent@example.com",
                user_id=None,
                blob="a" * 64,
                size=1,
                message_id_header="<read@example.com>",
                subject=subject,
                trusted_client=None,
            )
        )


async def test_a_read_sees_what_is_committed_and_leaves_nothing_open(database: Database) -> None:
    await add_message(database, "first")
    assert await database.read(subjects) == ["first"]
    await add_message(database, "second")  # BEGIN IMMEDIATE would fail inside an open read
    assert await database.read(subjects) == ["first", "second"]
    assert not await open_on_driver(database)


async def test_what_a_read_raises_comes_through_and_the_connection_stays_usable(
    database: Database,
) -> None:
    def failing(connection: Connection) -> None:
        connection.execute(text("SELECT no_such_column FROM messages"))

    for _ in range(2):
        with pytest.raises(Exception, match="no_such_column"):
            await database.read(failing)
    assert not await open_on_driver(database)
    await add_message(database, "after")
    assert await database.read(subjects) == ["after"]


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_a_read_on_postgresql_is_read_only(database: Database) -> None:
    def writing(connection: Connection) -> None:
        connection.execute(text("DELETE FROM messages"))

    with pytest.raises(Exception, match="read-only transaction"):
        await database.read(writing)


async def open_on_driver(database: Database) -> bool:
    """Whether the pooled SQLite connection is inside a transaction between uses (asked on
    the driver's own thread); PostgreSQL's pool rolls back on return as usual."""
    if database.is_postgres:
        return False
    async with database.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        return bool(await driver._execute(lambda: driver._conn.in_transaction))
