"""UTC columns on SQLite are written and read in one step each (gateway/store/models.py),
exactly as SQLAlchemy's own DATETIME processors after the UTC conversion: the same text in
the database (rows written before keep comparing and sorting with new ones) and the same
aware values back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.models import UtcDateTime

SQLITE = sqlite.dialect()
OFFSETS = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
AWARE = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=OFFSETS
)


def sqlalchemy_text(value: datetime) -> str:
    """What SQLAlchemy's own SQLite DATETIME writes for `value` in UTC."""
    process = DateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    assert process is not None
    text = process(value.astimezone(UTC).replace(tzinfo=None))
    assert isinstance(text, str)
    return text


@given(AWARE)
def test_sqlite_text_is_sqlalchemys(value: datetime) -> None:
    write = UtcDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    read = UtcDateTime().dialect_impl(SQLITE).result_processor(SQLITE, None)
    assert write is not None and read is not None
    text = write(value)
    assert text == sqlalchemy_text(value)
    back = read(text)
    assert back == value and back.tzinfo is UTC


@given(AWARE, AWARE)
def test_text_order_is_time_order(first: datetime, second: datetime) -> None:
    write = UtcDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    assert write is not None
    assert (write(first) < write(second)) == (first < second)


def test_naive_and_none() -> None:
    write = UtcDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    read = UtcDateTime().dialect_impl(SQLITE).result_processor(SQLITE, None)
    assert write is not None and read is not None
    assert write(None) is None and read(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        write(datetime(2026, 12, 6, 5, 30))


def test_postgresql_keeps_sqlalchemys_processors() -> None:
    dialect = postgresql.dialect()
    ours = UtcDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None
    at = datetime(2026, 12, 6, 7, 30, tzinfo=timezone(timedelta(hours=2)))
    assert ours(at) == at and ours(at).tzinfo is UTC


def test_a_sqlite_database_stores_and_compares_the_text() -> None:
    table = Table(
        "t", MetaData(), Column("id", Integer, primary_key=True), Column("at", UtcDateTime)
    )
    engine = create_engine("sqlite://")
    table.metadata.create_all(engine)
    berlin = timezone(timedelta(hours=1))
    with engine.begin() as connection:
        connection.execute(
            insert(table),
            [
                {"id": 1, "at": datetime(2026, 12, 6, 6, 30, tzinfo=berlin)},
                {"id": 2, "at": datetime(2026, 12, 6, 5, 29, 59, 999999, tzinfo=UTC)},
            ],
        )
        stored = connection.exec_driver_sql("SELECT at FROM t ORDER BY id").scalars().all()
        assert stored == ["2026-12-06 05:30:00.000000", "2026-12-06 05:29:59.999999"]
        later = connection.execute(
            select(table.c.id).where(
                table.c.at > datetime(2026, 12, 6, 5, 29, 59, 999999, tzinfo=UTC)
            )
        ).scalars()
        assert list(later) == [1]
        assert connection.execute(select(table.c.at).where(table.c.id == 1)).scalar_one() == (
            datetime(2026, 12, 6, 5, 30, tzinfo=UTC)
        )
