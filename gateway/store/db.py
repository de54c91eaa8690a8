"""Engine and sessions for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL with synchronous=FULL, so a commit is on disk when it returns. Each process
keeps one SQLite connection: writers queue in asyncio instead of sleeping in SQLite's busy
handler, and BEGIN IMMEDIATE takes the write lock up front so two processes never deadlock
upgrading a read lock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolResetState
from sqlalchemy.util import await_only

from gateway.store import admission, sqlite_thread
from gateway.store.schema_version import migration_heads, stored_revisions
from gateway.store.sqlite_lock import SQLITE_BUSY_TIMEOUT_MS, begin_write

MIGRATIONS = Path(__file__).parent / "migrations"
_WAL_ATTEMPTS = 40  # about 4 s of waiting in all
# PostgreSQL advisory lock held while migrating: any constant unique to sealrelay
_MIGRATION_LOCK = int.from_bytes(b"sealmigr", "big") >> 1
_SNAPSHOT = "sealrelay_snapshot"
# set in a session's `info` by whatever journaled events in its transaction (journal.append)
JOURNALED = "sealrelay_journaled"
T = TypeVar("T")


def make_engine(url: str, *, schema: str | None = None) -> AsyncEngine:
    """`schema` puts every table of a PostgreSQL connection in one schema (tests use it)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=120, pool_reset_on_return=None
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(url, pool_size=10, max_overflow=10, connect_args=connect_args)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor, engine.dialect.loaded_dbapi.OperationalError)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
        """The pool's rollback on return, left out after a transaction that SQLAlchemy or
        SQLite's thread (gateway/store/sqlite_thread.py) already ended: on aiosqlite each
        is a round trip to the driver's thread."""
        settled = record.info.pop(sqlite_thread.SETTLED, False)
        if not (settled or state.transaction_was_reset) and state.asyncio_safe:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_SNAPSHOT):
            connection.exec_driver_sql("BEGIN")  # WAL: a read snapshot that blocks no writer
            return
        # another process's write lock is polled for on aiosqlite's thread, where waiting
        # may sleep (gateway/store/sqlite_lock.py), as the group commit's batches do
        driver: Any = connection.connection.driver_connection
        await_only(driver._execute(begin_write, driver._conn))


def _switch_to_wal(cursor: Any, locked: type[Exception]) -> None:
    """While another process is creating a new database (two CLI commands started together,
    or `serve` and a CLI command), SQLite can refuse the switch to WAL with "database is
    locked" at once, without waiting in the busy handler: a lock upgrade it would otherwise
    have to deadlock on. The other process's switch takes milliseconds, so this one tries
    again, for a bounded time. It sleeps on the thread that connects (the event loop's):
    only a new database's first connection can meet this, at start-up."""
    for attempt in range(_WAL_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except locked:
            if attempt == _WAL_ATTEMPTS - 1:
                raise
            time.sleep(0.005 * (attempt + 1))


class Database:
    """The engine plus a session factory; `transaction()` is the only way code writes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Run by `close` before the engine goes: work still queued for a commit (the group
        # commit's writers, gateway/store/group_commit.py) is finished, not dropped.
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        # Called after a commit that added journal events: the sequencer
        # (gateway/store/sequencer.py) listens, to chain them at once.
        self.on_journaled: list[Callable[[], None]] = []

    @classmethod
    def connect(cls, url: str, *, schema: str | None = None) -> Database:
        return cls(make_engine(url, schema=schema))

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """Commits on leaving, rolls back on any exception."""
        async with admission.hold(), self.sessions() as session:
            async with session.begin():
                yield session
            if session.info.pop(JOURNALED, False):
                self.journaled()

    def journaled(self) -> None:
        """Say that a commit added journal events."""
        for listener in self.on_journaled:
            listener()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction that sees one consistent state of the whole database.

        For checks that read many statements' worth (the journal's chain and its head):
        PostgreSQL's REPEATABLE READ, SQLite's deferred read transaction in WAL. Neither
        blocks writers.
        """
        async with admission.hold(), self.sessions() as session, session.begin():
            if self.is_postgres:
                await session.connection(
                    execution_options={
                        "isolation_level": "REPEATABLE READ",
                        "postgresql_readonly": True,
                    }
                )
            else:
                await session.connection(execution_options={_SNAPSHOT: True})
            yield session

    async def read(self, work: Callable[[Connection], T]) -> T:
        """`work` (synchronous Core, no awaits) in a read snapshot as `snapshot` gives, run
        in one go: on SQLite whole on the driver's thread (gateway/store/sqlite_thread.py),
        on PostgreSQL in one greenlet. A visit's lookup is three or four statements; through
        a session each is a round trip of the loop and, on SQLite, of the driver's thread."""
        async with admission.hold():
            if not self.is_postgres:
                async with self.engine.connect() as connection:
                    return await sqlite_thread.run(connection, work, snapshot=True)
            async with self.engine.connect() as connection:
                await connection.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
                async with connection.begin():
                    return await connection.run_sync(work)

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration; alembic is imported only when there
        is one to run (gateway/store/schema_version.py)."""
        async with self.engine.connect() as connection:
            current = await connection.run_sync(stored_revisions)
        if current == migration_heads(MIGRATIONS / "versions"):
            return
        async with self.engine.begin() as connection:
            await connection.run_sync(_upgrade)

    async def schema_revisions(self) -> tuple[set[str], set[str]]:
        """(the revisions this database is at, the newest this code knows): equal when current.

        Reads only: a command that only looks must not create or migrate anything.
        """
        from alembic.script import ScriptDirectory

        async with self.engine.connect() as connection:
            current = await connection.run_sync(_current_revisions)
        script = ScriptDirectory(str(MIGRATIONS))
        return current, set(script.get_heads())

    async def close(self) -> None:
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            await hook()
        await self.engine.dispose()


def _current_revisions(connection: Connection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(connection).get_current_heads())


def _upgrade(connection: Connection) -> None:
    """Processes that start on a new database at once (hosts started together, or `serve`
    and a CLI command) take turns: on PostgreSQL each waits for a lock held to the end of the
    other's migration, and alembic then reads the version the other wrote; without it the
    second failed creating tables the first had just created. SQLite's BEGIN IMMEDIATE does
    the same (make_engine)."""
    from alembic import command
    from alembic.config import Config

    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
