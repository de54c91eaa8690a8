"""A Core statement compiled once per dialect and run on the DBAPI cursor.

SQLAlchemy spends about 100 us of CPU on each statement it executes (cache key, execution
context, parameter and result processing in layers) where the same statement on the
driver's cursor costs about 10 us. The group commit runs the same few statements for every
message (intake's INSERTs, journal events, claim, hold, settle), so those are written in Core
as usual and run here: compiled once per dialect (and per size of an IN list), their
parameters converted by the very bind processors SQLAlchemy uses (UTC datetimes, JSON,
booleans), Python-side column defaults filled in as Core fills them, result columns
converted by the types' result processors. No ORM, no events, no statement cache.

It runs on the cursor of the connection's own transaction, which the caller has begun (the
group commit's), so its writes commit or roll back with the rest. It leans on three of
SQLAlchemy's internals (the compiler's `_bind_processors` and `_result_columns`, the
connection's `_handle_dbapi_exception`); tests/store/test_raw_sql.py holds them to what
SQLAlchemy itself writes and reads, on both backends.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Column, Connection, Dialect, inspect
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Loaded", "RawStatement", "loaded", "python_default", "transient"]

_Processor = Callable[[Any], Any] | None
_Processed = tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, processor), where one is
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Variant:
    """The SQL for one length of each IN list, and how its positional arguments are made."""

    sql: str
    pick: Callable[[Mapping[str, Any]], tuple[Any, ...]]  # the values by name, in order
    processed: _Processed  # the positions that have a bind processor, with it
    fixed: dict[str, Any]  # values bound in the statement itself (literals)
    expansion: dict[str, list[str]]  # an IN list's name -> the names of its elements

    def arguments(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional arguments for `values` (every name bound), each processed."""
        return _processed_row(self.pick(values), self.processed)


def _picker(names: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """itemgetter, always giving a tuple."""
    if len(names) == 1:
        one = names[0]
        return lambda values: (values[one],)
    if not names:
        return lambda values: ()
    return operator.itemgetter(*names)


class _Compiled:
    def __init__(self, statement: ClauseElement, keys: Sequence[str] | None, dialect: Dialect):
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        assert isinstance(compiled, SQLCompiler)
        if not compiled.positional:
            raise ValueError(f"{dialect.name}: only positional paramstyles are run raw")
        if compiled.literal_execute_params:
            raise ValueError("a statement with literal-execute parameters cannot be run raw")
        self.compiled = compiled
        self.expanding = tuple(name for name, bind in compiled.binds.items() if bind.expanding)
        self.defaults = tuple(
            (column.key, _default_of(column, column.default)) for column in compiled.insert_prefetch
        ) + tuple(
            (column.key, _default_of(column, column.onupdate))
            for column in compiled.update_prefetch
        )
        self.results = _processed(
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in compiled._result_columns
        )
        self.variants: dict[tuple[int, ...], _Variant] = {}

    def variant(self, values: Mapping[str, Any]) -> _Variant:
        lengths = tuple(len(values[name]) for name in self.expanding)
        found = self.variants.get(lengths)
        if found is None:
            state = self.compiled.construct_expanded_state(dict(values))
            assert state.positiontup is not None
            expanded = {n for names in state.parameter_expansion.values() for n in names}
            # the state's processors are those of the IN lists' elements only
            processors: dict[str, Any] = {**self.compiled._bind_processors, **state.processors}
            found = self.variants[lengths] = _Variant(
                state.statement,
                _picker(state.positiontup),
                _processed(processors.get(name) for name in state.positiontup),
                {
                    k: v
                    for k, v in state.parameters.items()
                    if k not in values and k not in expanded
                },
                dict(state.parameter_expansion),
            )
        return found


class RawStatement:
    """`statement` (Core), run on the DBAPI cursor. `keys`: for an INSERT or UPDATE whose
    values come with each call, the columns given (as `column_keys` in a compile)."""

    def __init__(self, statement: ClauseElement, keys: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.keys = tuple(keys) if keys is not None else None
        self._by_dialect: dict[tuple[type[Dialect], str], _Compiled] = {}

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute with `params`; the rows it returns (RETURNING or SELECT), converted."""
        compiled = self._compiled(connection)
        fetched = _run(connection, compiled, [params], fetch=True)
        return [_processed_row(tuple(row), compiled.results) for row in fetched]

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> None:
        """Execute with `params`, reading nothing back."""
        self.executemany(connection, [params])

    def executemany(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per parameter set in `rows`, in one call of the driver. Every set
        has the same keys (and the same length of each IN list)."""
        if rows:
            _run(connection, self._compiled(connection), rows, fetch=False)

    def _compiled(self, connection: Connection) -> _Compiled:
        if not connection.in_transaction():
            raise RuntimeError("run raw statements in the connection's begun transaction")
        dialect = connection.dialect
        key = (type(dialect), dialect.paramstyle)
        compiled = self._by_dialect.get(key)
        if compiled is None:
            compiled = self._by_dialect[key] = _Compiled(self.statement, self.keys, dialect)
        return compiled


def _run(
    connection: Connection,
    compiled: _Compiled,
    rows: Sequence[Mapping[str, Any]],
    *,
    fetch: bool,
) -> list[Any]:
    """Errors come out as SQLAlchemy raises them (IntegrityError, a lost connection
    invalidated), through the connection's own handling."""
    sql: str | None = None
    args: list[tuple[Any, ...]] = []
    cursor = None
    try:
        for row in rows:
            variant, values = _values(compiled, row)
            sql = variant.sql
            args.append(variant.arguments(values))
        assert sql is not None
        cursor = _cursor(connection)
        if len(args) == 1:
            cursor.execute(sql, args[0])
        else:
            cursor.executemany(sql, args)
        fetched = cursor.fetchall() if fetch and cursor.description else []
        cursor.close()
        return list(fetched)
    except Exception as exc:
        connection._handle_dbapi_exception(exc, sql, args, cursor, None)


def _values(compiled: _Compiled, params: Mapping[str, Any]) -> tuple[_Variant, Mapping[str, Any]]:
    """The statement's form for `params`, and every value it binds by name (unprocessed)."""
    if not compiled.defaults and not compiled.expanding:  # one form; nothing to add per row
        variant = compiled.variant(params)
        return variant, {**params, **variant.fixed} if variant.fixed else params
    values = dict(params)
    for key, default in compiled.defaults:
        if key not in values:
            values[key] = default()
    for name in compiled.expanding:
        values[name] = _padded(values[name])
    variant = compiled.variant(values)
    values.update(variant.fixed)
    for name, names in variant.expansion.items():
        values.update(zip(names, values[name], strict=True))
    return variant, values


def _processed(processors: Iterable[_Processor]) -> _Processed:
    """The positions that have a processor, with it: most values need none."""
    return tuple((index, p) for index, p in enumerate(processors) if p is not None)


def _processed_row(values: tuple[Any, ...], processed: _Processed) -> tuple[Any, ...]:
    if not processed:
        return values
    found = list(values)
    for index, process in processed:
        found[index] = process(found[index])
    return tuple(found)


def _padded(items: Sequence[Any]) -> Sequence[Any]:
    """An IN list made up to a power of two with its last element (a value twice in an IN
    list changes nothing), so that a statement has a handful of forms rather than one per
    length: fewer to keep here, and the driver's prepared statements (asyncpg keeps 100)
    are used again instead of prepared anew."""
    size = 1 << max(len(items) - 1, 0).bit_length()
    if len(items) < 2 or size == len(items):
        return items
    return [*items, *[items[-1]] * (size - len(items))]


def _default_of(column: Column[Any], default: Any) -> Callable[[], Any]:
    found = python_default(default)
    if found is None:
        raise ValueError(f"{column}: a default that cannot be computed here")
    return found


def python_default(default: Any) -> Callable[[], Any] | None:
    """A column's Python-side default (on INSERT) or onupdate (on UPDATE), as Core computes
    it for a column the statement does not set: a scalar, or a function of no context. None
    when there is none, or only one the server computes."""
    if default is None or not (default.is_scalar or default.is_callable):
        return None
    arg = default.arg
    if default.is_callable:
        return lambda: arg(None)
    return lambda: arg


def _cursor(connection: Connection) -> Any:
    """The DBAPI cursor of `connection` (on PostgreSQL SQLAlchemy's asyncpg adapter, which
    runs each call on the connection's greenlet)."""
    return connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


@dataclass(frozen=True)
class Loaded(Generic[_T]):
    """A mapped class as a raw SELECT reads it: every column of its table, in order, and the
    attribute each loads into; `load` makes the object from a row's slice of values."""

    cls: type[_T]
    columns: tuple[Column[Any], ...]
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.columns)

    def load(self, values: Sequence[Any]) -> _T:
        return transient(self.cls, zip(self.keys, values, strict=True))


def transient(cls: type[_T], values: Iterable[tuple[str, Any]]) -> _T:
    """A transient object holding `values`, made as the ORM makes the rows it loads: no
    constructor, no change events per attribute (which cost ten times as much). A flush
    after `session.add` still inserts them all: an INSERT takes the object's dict."""
    instance: _T = manager_of_class(cls).new_instance()
    instance.__dict__.update(values)
    return instance


def loaded(cls: type[_T]) -> Loaded[_T]:
    mapper = inspect(cls)
    columns = tuple(cls.__table__.c)  # type: ignore[attr-defined]
    return Loaded(cls, columns, tuple(mapper.get_property_by_column(c).key for c in columns))
