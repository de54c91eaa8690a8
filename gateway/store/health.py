"""What /healthz and /metrics ask of the database, so the web holds no SQL; whether the blob
store answers (BlobHealth), told at once of every failure of the store (WatchedBlobStore)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import IO

from sqlalchemy import func, select, text

from gateway.store import journal, loop_events
from gateway.store.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobReader,
    BlobStore,
    HashedFile,
    StoreUnavailable,
)
from gateway.store.db import Database
from gateway.store.metrics import BLOB_STORE_AVAILABLE
from gateway.store.models import Delivery, DeliveryStatus

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 20.0  # seconds a check may take before the store counts as unavailable
RECHECK_FIRST = 1.0  # seconds before the first check again once the store failed
RECHECK_MAX = 30.0  # the longest wait between checks while it fails (and while it answers)


async def database_answers(db: Database) -> None:
    """Returns when the database answers a trivial query; raises whatever reaching it raised."""
    async with db.transaction() as session:
        await session.execute(text("SELECT 1"))


async def journal_lag(db: Database) -> journal.Lag:
    """The journal's events not chained yet (gateway/store/sequencer.py), a read only."""
    async with db.snapshot() as session:
        return await journal.lag(session)


async def queue_depths(db: Database) -> dict[str, int]:
    """Deliveries per status, every status named (0 when it has none)."""
    async with db.transaction() as session:
        rows = await session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        )
        counts = {status: count for status, count in rows}
    return {status.value: counts.get(status.value, 0) for status in DeliveryStatus}


class BlobHealth:
    """Whether the blob store answered its last check, kept up to date by `run`.

    A relay whose bucket cannot be reached at start still starts, degraded: /healthz and
    /metrics say so, SMTP intake answers 451 before the client sends its data, and the
    check is made again after 1, 2, 4 … seconds, at most RECHECK_MAX apart, until the
    store answers; then the relay is whole again without a restart. Checks go on every
    RECHECK_MAX while it answers, so an outage shows on /healthz within that time even when
    no mail comes; any put or read of the store that fails (`watched`) says so at once,
    through `failed`, and wakes `run` to check again.
    """

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.problem: str | None = None
        self._changed = asyncio.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        BLOB_STORE_AVAILABLE.set(1)

    @property
    def available(self) -> bool:
        return self.problem is None

    def watched(self, store: BlobStore) -> BlobStore:
        """`store` telling this health of each of its failures (see WatchedBlobStore)."""
        return WatchedBlobStore(store, self.failed)

    async def check(self) -> bool:
        """Ask the store now; whether it answered."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self.blobs.check()
        except StoreUnavailable as exc:
            self.failed(exc)
        except TimeoutError:
            self.failed(StoreUnavailable(f"no answer within {CHECK_TIMEOUT:g} s"))
        else:
            with self._lock:
                if self.problem is not None:
                    log.warning("blob store available again; the relay is whole")
                self.problem = None
                BLOB_STORE_AVAILABLE.set(1)
        return self.available

    def failed(self, exc: StoreUnavailable) -> None:
        """The store failed a put, a read or a check: degraded until a check passes. Safe
        from any thread and any event loop: `run`'s loop is woken through its own queue."""
        with self._lock:
            became = self.problem is None
            self.problem = str(exc)
            BLOB_STORE_AVAILABLE.set(0)
        if became:
            log.warning("blob store unavailable, the relay is degraded: %s", exc)
            self._wake()

    def _wake(self) -> None:
        """Let `run` check again now (it waits on `_changed`, an event of its loop)."""
        loop = self._loop
        if loop is None:  # `run` has not started: nothing waits on the event yet
            self._changed.set()
            return
        loop_events.set_in(loop, self._changed)

    async def run(self, stop: asyncio.Event, *, checked: bool = False) -> None:
        """Check until `stop`: backing off while the store fails, at RECHECK_MAX while not.
        `checked`: a check was just made (the relay's start), so the first one waits."""
        self._loop = asyncio.get_running_loop()
        wait = RECHECK_FIRST
        answered: bool | None = self.available if checked else None
        while not stop.is_set():
            if answered is None:
                answered = await self.check()
            if answered:
                wait = RECHECK_FIRST
                pause = RECHECK_MAX
            else:
                pause, wait = wait, min(wait * 2, RECHECK_MAX)
            answered = None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await _first(stop, self._changed)


class WatchedBlobStore(BlobStore):
    """`store` as it is, except that each StoreUnavailable it raises (a put, a read, a
    reader's bytes mid-stream, a list) is first told to `failed`: the relay then answers
    "try again later" at SMTP's MAIL FROM and the milter's at once, instead of after the next
    check, up to RECHECK_MAX later. A missing blob (BlobMissing) is no failure of the store."""

    def __init__(self, store: BlobStore, failed: Callable[[StoreUnavailable], None]) -> None:
        self.store = store
        self._failed = failed

    @contextlib.contextmanager
    def _watch(self) -> Iterator[None]:
        try:
            yield
        except StoreUnavailable as exc:
            self._failed(exc)
            raise

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        with self._watch():
            return await self.store.put_stream(chunks)

    async def put(self, data: bytes) -> str:
        with self._watch():
            return await self.store.put(data)

    async def put_file(self, file: HashedFile) -> str:
        with self._watch():
            return await self.store.put_file(file)

    def takes_inline(self, size: int) -> bool:
        return self.store.takes_inline(size)

    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        return self._open(digest)

    @asynccontextmanager
    async def _open(self, digest: str) -> AsyncIterator[BlobReader]:
        with self._watch():
            async with self.store.open(digest) as blob:
                yield WatchedBlobReader(blob, self._watch)

    async def read(self, digest: str) -> bytes:
        with self._watch():
            return await self.store.read(digest)

    async def read_start(self, digest: str, length: int) -> bytes:
        with self._watch():
            return await self.store.read_start(digest, length)

    async def size(self, digest: str) -> int:
        with self._watch():
            return await self.store.size(digest)

    async def exists(self, digest: str) -> bool:
        with self._watch():
            return await self.store.exists(digest)

    async def delete(self, digest: str) -> None:
        with self._watch():
            await self.store.delete(digest)

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        with self._watch():
            return await self.store.delete_stale(digest, written_before)

    async def list(self) -> AsyncIterator[BlobInfo]:
        with self._watch():
            async for info in self.store.list():
                yield info

    def location(self, digest: str) -> str:
        return self.store.location(digest)

    async def where(self, digest: str) -> str:
        with self._watch():
            return await self.store.where(digest)

    async def check(self) -> None:
        with self._watch():
            await self.store.check()

    async def remove_interrupted_writes(self) -> int:
        with self._watch():
            return await self.store.remove_interrupted_writes()

    async def close(self) -> None:
        await self.store.close()


class WatchedBlobReader(BlobReader):
    """A reader of a WatchedBlobStore: its failures are told as the store's are."""

    def __init__(
        self, blob: BlobReader, watch: Callable[[], contextlib.AbstractContextManager[None]]
    ) -> None:
        self._blob = blob
        self._watch = watch
        self.window = blob.window

    @property
    def size(self) -> int:
        return self._blob.size

    async def read(self, start: int, length: int) -> bytes:
        with self._watch():
            return await self._blob.read(start, length)

    async def stream(
        self, start: int, length: int, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        chunks = self._blob.stream(start, length, chunk_size)
        try:
            with self._watch():
                async for chunk in chunks:
                    yield chunk
        finally:
            if isinstance(chunks, AsyncGenerator):  # let go of a body, a file, at once
                await chunks.aclose()

    def kernel_file(self) -> IO[bytes] | None:
        return self._blob.kernel_file()

    def uncache(self) -> None:
        self._blob.uncache()


async def _first(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
