"""Small blobs in the database, in the transaction that commits the rows naming them.

A file blob is durable only after its own fsyncs (the file, its directory, at times a new
fan-out directory's parent) before the group commit's fsync makes the rows naming it
durable. A small message's original costs far more in those fsyncs than in its bytes, so
the intake keeps blobs of at most `[storage] inline_max_bytes` as rows of `inline_blobs`,
inserted by the same unit of the group commit (gateway/store/group_commit.py) as the
message: one commit makes both durable, and a rolled-back or killed transaction leaves
neither. Large blobs, and every blob written elsewhere, stay files (or S3 objects).

`InlineBlobStore` puts the table in front of the configured store, so that everything that
reads blobs by digest (delivery, pages, letters, downloads, the sweeper) finds these too,
whichever store holds the rest. Its puts go to that store: only the intake writes rows here.
The intake's blobs of the last `RECENT_BYTES` are also kept in memory once committed: a
small message is delivered within moments by the same process, and reading its original
back was a query and a pooled connection per message, with 20 deliveries at once more
connections than the pool keeps (PostgreSQL: 209 connections opened and closed for 3,000
messages in bench/relay.py).

A put of bytes already here makes the row young again (ON CONFLICT DO UPDATE of
`written_at`), as a put refreshes a file's mtime: the sweeper's delete takes a row only if it
is still older than the grace period at the moment of the DELETE, so a message committed
with the same bytes after the sweeper's look keeps them.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import aiosqlite
from sqlalchemy import Connection, Insert, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.blobs import (
    BlobInfo,
    BlobMissing,
    BlobReader,
    BlobStore,
    HashedFile,
    checked_digest,
)
from gateway.store.db import Database
from gateway.store.models import InlineBlob
from gateway.store.sqlite_lock import SQLITE_BUSY_TIMEOUT_MS

LIST_PAGE = 1000  # rows per query while the sweeper lists
FILED_KEPT = 4096  # digests remembered as found in the files, the latest kept
RECENT_BYTES = 8 * 1024 * 1024  # the intake's latest inline blobs kept in memory, in all


def insert(connection: Connection, blobs: Iterable[tuple[str, bytes, datetime]]) -> None:
    """Store `blobs` (digest, bytes, written at) in `connection`'s transaction.

    Two messages of one group commit may carry the same bytes: each digest goes in once,
    at the later time, since one statement may not touch a row twice.
    """
    rows: dict[str, dict[str, Any]] = {}
    for digest, data, at in blobs:
        known = rows.get(digest)
        if known is None or known["written_at"] < at:
            rows[digest] = {"digest": digest, "size": len(data), "written_at": at, "data": data}
    if rows:
        connection.execute(_upsert(connection.dialect.name), list(rows.values()))


@functools.cache
def _upsert(dialect: str) -> Insert:
    """INSERT, or make the stored row young again: built once per dialect."""
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(InlineBlob)
    return statement.on_conflict_do_update(
        index_elements=[InlineBlob.digest], set_={"written_at": statement.excluded.written_at}
    )


class InlineBlobStore(BlobStore):
    """The inline table in front of `files` (a local directory or S3): reads look here first."""

    def __init__(self, db: Database, files: BlobStore, max_inline: int) -> None:
        self.db = db
        self.files = files
        self.max_inline = max_inline
        self._reads: _Reads = _PostgresReads(db) if db.is_postgres else _SqliteReads(db)
        # digests last opened from `files`: a download link's file is opened there first
        self._filed: OrderedDict[str, None] = OrderedDict()
        self._recent: OrderedDict[str, bytes] = OrderedDict()  # committed by the intake
        self._recent_bytes = 0

    def takes_inline(self, size: int) -> bool:
        return 0 < size <= self.max_inline

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        return await self.files.put_stream(chunks)

    async def put(self, data: bytes) -> str:
        return await self.files.put(data)

    async def put_file(self, file: HashedFile) -> str:
        return await self.files.put_file(file)

    def committed_inline(self, blobs: Mapping[str, bytes]) -> None:
        for digest, data in blobs.items():
            if digest in self._recent:
                self._recent.move_to_end(digest)
                continue
            self._recent[digest] = data
            self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            self._recent_bytes -= len(self._recent.popitem(last=False)[1])

    def _forget(self, digest: str) -> None:
        data = self._recent.pop(digest, None)
        if data is not None:
            self._recent_bytes -= len(data)

    async def _data(self, digest: str) -> bytes | None:
        recent = self._recent.get(checked_digest(digest))
        if recent is not None:
            return recent
        found: bytes | None = await self._reads.value(_DATA, digest)
        return found

    async def _size(self, digest: str) -> int | None:
        recent = self._recent.get(checked_digest(digest))
        if recent is not None:
            return len(recent)
        found: int | None = await self._reads.value(_SIZE, digest)
        return found

    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        return self._open(digest)

    @asynccontextmanager
    async def _open(self, digest: str) -> AsyncIterator[BlobReader]:
        async with AsyncExitStack() as held:
            if digest in self._filed:  # a linked file downloaded again: no look in the table
                try:
                    blob = await held.enter_async_context(self.files.open(digest))
                except BlobMissing:  # gone from the files: the table may hold the bytes
                    self._filed.pop(digest, None)
                else:
                    yield blob
                    return
            data = await self._data(digest)
            if data is not None:
                yield InlineBlobReader(data)
                return
            blob = await held.enter_async_context(self.files.open(digest))
            self._filed[digest] = None
            if len(self._filed) > FILED_KEPT:
                self._filed.popitem(last=False)
            yield blob

    async def read(self, digest: str) -> bytes:
        data = await self._data(digest)
        return data if data is not None else await self.files.read(digest)

    async def read_start(self, digest: str, length: int) -> bytes:
        data = await self._data(digest)
        if data is not None:
            return data[:length]
        return await self.files.read_start(digest, length)

    async def size(self, digest: str) -> int:
        size = await self._size(digest)
        return size if size is not None else await self.files.size(digest)

    async def exists(self, digest: str) -> bool:
        return await self._size(digest) is not None or await self.files.exists(digest)

    async def delete(self, digest: str) -> None:
        checked_digest(digest)
        self._forget(digest)
        async with self.db.transaction() as session:
            await session.execute(delete(InlineBlob).where(InlineBlob.digest == digest))
        await self.files.delete(digest)

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        """The row if it is still old at the DELETE; else the file, if there is one.

        `list` yields a digest once per place it is in, so a blob both here and in `files`
        is taken in two calls, each judged on its own age.
        """
        checked_digest(digest)
        async with self.db.transaction() as session:
            size: int | None = await session.scalar(
                delete(InlineBlob)
                .where(InlineBlob.digest == digest, InlineBlob.written_at < written_before)
                .returning(InlineBlob.size)
            )
        if size is not None:
            self._forget(digest)
            return size
        return await self.files.delete_stale(digest, written_before)

    async def list(self) -> AsyncIterator[BlobInfo]:
        after = ""
        while True:
            async with self.db.snapshot() as session:
                page = (
                    await session.execute(
                        select(InlineBlob.digest, InlineBlob.size, InlineBlob.written_at)
                        .where(InlineBlob.digest > after)
                        .order_by(InlineBlob.digest)
                        .limit(LIST_PAGE)
                    )
                ).all()
            for digest, size, written_at in page:
                yield BlobInfo(digest, size, written_at)
            if len(page) < LIST_PAGE:
                break
            after = page[-1][0]
        async for info in self.files.list():
            yield info

    def location(self, digest: str) -> str:
        """Where `files` keeps the blob, or would: a blob held in the table is not there,
        which only a query can tell (`where`)."""
        return self.files.location(digest)

    async def where(self, digest: str) -> str:
        """The table's row when the blob is one, else where `files` has it."""
        if await self._size(digest) is not None:
            return f"database table {InlineBlob.__tablename__}, digest {digest}"
        return await self.files.where(digest)

    async def check(self) -> None:
        await self.files.check()

    async def remove_interrupted_writes(self) -> int:
        return await self.files.remove_interrupted_writes()

    async def close(self) -> None:
        await self.files.close()


_DATA = "data"
_SIZE = "size"


class _Reads(Protocol):
    async def value(self, column: str, digest: str) -> Any:
        """`column` of the row for `digest`, None when there is none."""


class _PostgresReads:
    """One statement on a pooled connection, straight through asyncpg with no transaction
    around it: delivery reads every copy, and SQLAlchemy's BEGIN, statement and ROLLBACK on
    the loop cost twice the CPU (0.8 against 0.4 ms a read, measured on a busy box)."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine.execution_options(isolation_level="AUTOCOMMIT")

    async def value(self, column: str, digest: str) -> Any:
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            asyncpg: Any = raw.driver_connection
            return await asyncpg.fetchval(_POSTGRES_SELECT[column], digest)


class _SqliteReads:
    """A second SQLite connection, for reads only, each one hop to its thread.

    Callers read blobs inside their own transactions (a letter's held original, read while
    its row is locked), when the relay's one SQLite connection is taken; in WAL this one
    reads beside it and blocks no writer. It is sqlite3's own, not the engine's: a read is a
    single SELECT with no transaction around it to begin and end.
    """

    def __init__(self, db: Database) -> None:
        self._path = db.engine.url.database or ":memory:"
        self._connection: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        db.on_close.append(self.close)

    async def value(self, column: str, digest: str) -> Any:
        connection = self._connection or await self._open()
        rows = list(await connection.execute_fetchall(_SQLITE_SELECT[column], (digest,)))
        return rows[0][0] if rows else None

    async def _open(self) -> aiosqlite.Connection:
        async with self._opening:
            if self._closed:  # opened now, its thread would keep the process from exiting
                raise RuntimeError("the database is closed")
            if self._connection is None:
                connection = await aiosqlite.connect(self._path, isolation_level=None)
                await connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                self._connection = connection
            return self._connection

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


_POSTGRES_SELECT = {
    _DATA: "SELECT data FROM inline_blobs WHERE digest = $1",
    _SIZE: "SELECT size FROM inline_blobs WHERE digest = $1",
}
_SQLITE_SELECT = {
    _DATA: "SELECT data FROM inline_blobs WHERE digest = ?",
    _SIZE: "SELECT size FROM inline_blobs WHERE digest = ?",
}


class InlineBlobReader(BlobReader):
    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    async def read(self, start: int, length: int) -> bytes:
        return self._data[start : start + length]
