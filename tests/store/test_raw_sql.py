"""Statements run raw on the driver's cursor (gateway/store/raw_sql.py) write and read what
SQLAlchemy would: rows written that way are stored and read back through the ORM exactly as
rows the ORM wrote; defaults, IN lists and errors behave as in Core. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError

from gateway.store import bulk, journal
from gateway.store.db import Database
from gateway.store.events import DELIVERY_DELIVERED
from gateway.store.models import (
    Base,
    Delivery,
    DeliveryStatus,
    Event,
    Message,
    MessageKind,
    new_id,
    utcnow,
)
from gateway.store.raw_sql import RawStatement

AT = datetime(2026, 12, 3, 13, 5, 7, 123456, tzinfo=UTC)


def twins(build: Any = None) -> tuple[list[Base], list[Base]]:
    """The same message and copy twice, under different ids: every kind of column set.
    `build(model, **values)` makes the rows (default: the model's constructor)."""
    build = build or (lambda model, **values: model(**values))
    pairs: tuple[list[Base], list[Base]] = ([], [])
    for rows in pairs:
        message = build(
            Message,
            id=new_id(),
            kind=MessageKind.BOUNCE,
            received_at=AT,
            sender="agent@example.com",
            user_id=None,
            blob="a" * 64,
            size=12345678901,
            message_id_header="<ü@example.com>",
            subject="Exposé ✓ «quoted» 'single'",
            trusted_client=None,
        )
        copy = build(
            Delivery,
            id=new_id(),
            message_id=message.id,
            recipient="p@example.com",
            blob="b" * 64,
            status=DeliveryStatus.QUEUED,
            next_attempt_at=AT,
            expires_at=AT + timedelta(days=5),
            lease_until=AT.astimezone(UTC) + timedelta(microseconds=1),
            keep_signed=True,
            last_error=None,
            updated_at=AT,
        )
        rows += [message, copy]
    return pairs


async def add_by_orm(db: Database, rows: list[Base]) -> None:
    async with db.transaction() as session:
        for row in rows:  # the message's row first: no relationship orders them
            session.add(row)
            await session.flush()


def columns(row: Base) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns if c.key not in ("id",)}


async def stored_text(db: Database, table: str, row_id: str) -> tuple[Any, ...]:
    """The row as the database holds it, read past every type of ours."""
    async with db.transaction() as session:
        row = (
            await session.execute(text(f"SELECT * FROM {table} WHERE id = :id"), {"id": row_id})
        ).one()
    return tuple(v for k, v in row._mapping.items() if k != "id")


async def run(db: Database, work: Any) -> Any:
    async with db.transaction() as session:
        return await session.run_sync(lambda sync: work(sync.connection()))


async def test_rows_written_raw_read_back_as_the_orm_wrote_them(database: Database) -> None:
    by_orm, raw = twins()
    await add_by_orm(database, by_orm)
    await run(database, lambda connection: bulk.insert_rows(connection, raw))
    data = {"recipient": "p@example.com", "attempt": 3, "remote": None, "route": "Exposé ✓"}
    async with database.transaction() as session:
        await journal.append(
            session, [DELIVERY_DELIVERED.new(data, message_id=by_orm[0].id, delivery_id="d1")], AT
        )
    await run(
        database,
        lambda connection: journal.append_rows(
            connection,
            [([DELIVERY_DELIVERED.new(data, message_id=raw[0].id, delivery_id="d1")], AT)],
        ),
    )
    async with database.transaction() as session:
        for a, b in zip(by_orm, raw, strict=True):
            read_a = await session.get(type(a), a.id, populate_existing=True)
            read_b = await session.get(type(b), b.id, populate_existing=True)
            assert read_a is not None and read_b is not None
            expected = columns(read_a)
            if isinstance(read_a, Delivery):
                expected["message_id"] = b.message_id  # type: ignore[attr-defined]
            assert columns(read_b) == expected
            assert read_b.keep_signed is True if isinstance(read_b, Delivery) else True
        events = (await session.scalars(select(Event).order_by(Event.id))).all()
    assert [(e.at, e.type, e.data) for e in events] == [(AT, "delivery.delivered", data)] * 2
    assert events[1].at.tzinfo is not None
    for table, a, b in (("messages", by_orm[0], raw[0]), ("deliveries", by_orm[1], raw[1])):
        stored_a = await stored_text(database, table, a.id)  # type: ignore[attr-defined]
        stored_b = await stored_text(database, table, b.id)  # type: ignore[attr-defined]
        if table == "deliveries":  # message_id differs
            stored_a, stored_b = stored_a[1:], stored_b[1:]
        assert stored_a == stored_b
    async with database.transaction() as session:
        stored_data = (await session.execute(text("SELECT data FROM events ORDER BY id"))).all()
    assert stored_data[0] == stored_data[1]


@pytest.mark.parametrize("way", ["flush", "insert_rows"])
async def test_rows_made_by_new_row_are_stored_as_the_constructor_s(
    database: Database, way: str
) -> None:
    """bulk.new_row skips the ORM's attribute events; a flush after session.add (the letter
    desk adds copies so) and insert_rows must still write every value, defaults included."""
    [by_constructor, _], [made, _] = twins(), twins(bulk.new_row)
    await add_by_orm(database, by_constructor)
    if way == "flush":
        await add_by_orm(database, made)
    else:
        await run(database, lambda connection: bulk.insert_rows(connection, made))
    async with database.transaction() as session:
        for a, b in zip(by_constructor, made, strict=True):
            read_a = await session.get(type(a), a.id, populate_existing=True)  # type: ignore[attr-defined]
            read_b = await session.get(type(b), b.id, populate_existing=True)  # type: ignore[attr-defined]
            assert read_a is not None and read_b is not None
            expected = columns(read_a)
            if isinstance(read_a, Delivery):
                expected["message_id"] = b.message_id  # type: ignore[attr-defined]
            assert columns(read_b) == expected
    assert made[0].kind == MessageKind.BOUNCE and made[1].attempts == 0  # type: ignore[attr-defined]


def test_new_row_refuses_what_the_model_does_not_have() -> None:
    with pytest.raises(TypeError, match=r"Message has no attribute\(s\) colour"):
        bulk.new_row(Message, id=new_id(), colour="red")


async def test_returned_columns_are_converted_and_in_lists_of_any_length_read_alike(
    database: Database,
) -> None:
    _, raw = twins()
    await run(database, lambda connection: bulk.insert_rows(connection, raw))
    statement = RawStatement(
        select(Delivery.lease_until, Delivery.keep_signed, Delivery.attempts, Message.size)
        .join(Message, Message.id == Delivery.message_id)
        .where(Delivery.id.in_(bindparam("ids", expanding=True)))
    )
    copy = raw[1]
    assert isinstance(copy, Delivery)
    others = [f"x{n}" for n in range(40)]
    for ids in ([copy.id], [copy.id, *others[:2]], [*others[:4], copy.id], [copy.id, *others]):
        rows = await run(
            database, lambda connection, ids=ids: statement.rows(connection, {"ids": ids})
        )
        assert rows == [(copy.lease_until, True, 0, 12345678901)]
        assert rows[0][0].tzinfo is not None
    # an IN list is padded to a power of two: 1, 3, 5 and 41 ids took 1, 4, 8 and 64 places
    assert sorted(lengths for v in statement._by_dialect.values() for (lengths,) in v.variants) == [
        1,
        4,
        8,
        64,
    ]


async def test_a_raw_update_fills_onupdate_columns_as_core_does(database: Database) -> None:
    _, raw = twins()
    await run(database, lambda connection: bulk.insert_rows(connection, raw))
    copy = raw[1]
    assert isinstance(copy, Delivery)
    statement = RawStatement(
        update(Delivery.__table__)
        .where(Delivery.__table__.c.id == bindparam("id"))
        .values(attempts=bindparam("n")),
        keys=(),
    )
    before = utcnow()
    await run(database, lambda c: statement.executemany(c, [{"id": copy.id, "n": 7}]))
    async with database.transaction() as session:
        stored = await session.get(Delivery, copy.id)
    assert stored is not None and stored.attempts == 7
    assert stored.updated_at >= before


async def test_errors_come_out_as_sqlalchemy_raises_them(database: Database) -> None:
    by_orm, _ = twins()
    await add_by_orm(database, by_orm)
    again = Message(**{k: v for k, v in columns(by_orm[0]).items()}, id=by_orm[0].id)  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError):
        await run(database, lambda connection: bulk.insert_rows(connection, [again]))
    naive = RawStatement(insert(Event.__table__), ("at", "type", "data"))
    with pytest.raises(StatementError, match="naive datetime"):
        await run(
            database,
            lambda c: naive.execute(c, {"at": datetime(2026, 1, 1), "type": "t", "data": {}}),
        )


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_outside_a_begun_transaction_it_refuses(database: Database) -> None:
    statement = RawStatement(select(Event.id))

    def outside(connection: Connection) -> None:
        statement.rows(connection, {})

    async with database.engine.connect() as connection:
        with pytest.raises(RuntimeError, match="transaction"):
            await connection.run_sync(outside)
