"""Insert ORM-built rows with SQLAlchemy Core: one executemany per table, parents first.

Intake builds its rows as mapped objects (they read clearly and the materializers share
them), but the ORM's unit of work costs milliseconds of CPU per message; an executemany of
the same values costs a tenth of that. The objects end up as a flush would leave them: every
column that has a Python-side default gets its value, so callers can read `row.id` or
`row.kind` afterwards. Objects are not attached to any session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, insert, inspect

from gateway.store.models import Base
from gateway.store.raw_sql import RawStatement, python_default, transient

_ORDER = {table: index for index, table in enumerate(Base.metadata.sorted_tables)}
Row = TypeVar("Row", bound=Base)


def new_row(model: type[Row], **values: Any) -> Row:
    """`model(**values)` without the ORM's attribute events, which record each value as a
    change for a flush: they cost 24 of a Message's 26 us, on every message."""
    unknown = values.keys() - _attributes(model)
    if unknown:
        raise TypeError(f"{model.__name__} has no attribute(s) {', '.join(sorted(unknown))}")
    return transient(model, values.items())


@functools.cache
def _attributes(model: type[Base]) -> frozenset[str]:
    return frozenset(inspect(model).attrs.keys())


def insert_rows(connection: Connection, rows: Sequence[Base]) -> None:
    """INSERT every row in `connection`'s transaction; tables in dependency order (parents
    before the rows that refer to them), rows of one table in the order given. One
    executemany per table and set of columns, on the driver's cursor
    (gateway/store/raw_sql.py)."""
    batches: dict[tuple[Table, tuple[str, ...]], list[dict[str, Any]]] = {}
    for row in rows:
        table, values = _values(row)
        batches.setdefault((table, tuple(values)), []).append(values)
    for (table, keys), batch in sorted(batches.items(), key=lambda item: _ORDER[item[0][0]]):
        _insert(table, keys).executemany(connection, batch)


@functools.cache
def _insert(table: Table, keys: tuple[str, ...]) -> RawStatement:
    """One INSERT per table and set of columns, compiled once."""
    return RawStatement(insert(table), keys)


def _values(row: Base) -> tuple[Table, dict[str, Any]]:
    """The row's table and its column values, Python-side defaults filled in on the object."""
    table, layout = _layout(type(row))
    values: dict[str, Any] = {}
    state = row.__dict__
    for key, column_key, default in layout:
        value = state.get(key)
        if value is None:
            # As a flush does: None leaves the column to its default, Python's or the server's.
            if default is None:
                continue
            value = state[key] = default()  # no attribute event: the row is transient
        values[column_key] = value
    return table, values


_Layout = tuple[tuple[str, str, Callable[[], Any] | None], ...]


@functools.cache
def _layout(model: type[Base]) -> tuple[Table, _Layout]:
    """The model's table, and per column its attribute, its key and its Python-side default
    (None when it has none that can be computed here)."""
    mapper = inspect(model)
    table = mapper.local_table
    assert isinstance(table, Table)
    return table, tuple(
        (prop.key, prop.columns[0].key, python_default(prop.columns[0].default))
        for prop in mapper.column_attrs
    )
