"""The sweep against an intake that puts the same bytes again, or commits a row naming
them, after the sweep listed the blob as old and unneeded: the blob stays (on the local
store and on S3, tests/s3_server.py), while a blob nobody touched still goes."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store import sweeper
from gateway.store.blobs import BlobInfo, BlobReader, BlobStore
from gateway.store.db import Database
from gateway.store.models import Message
from tests.store.test_blob_contract import STORES, _age

GRACE = timedelta(days=7)
AGAIN = b"an attachment an agent sends again, a month later"
ORPHAN = b"left by an intake that never committed"


class AfterListing(BlobStore):
    """A real store whose listing, read to its end, lets `then` happen: the moment between
    the sweep's listing and its deletes, when an intake may be at work."""

    def __init__(self, store: BlobStore, then: Callable[[], Awaitable[object]]) -> None:
        self.store = store
        self.then = then

    async def list(self) -> AsyncIterator[BlobInfo]:
        async for info in self.store.list():
            yield info
        await self.then()

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        return await self.store.put_stream(chunks)

    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        return self.store.open(digest)

    async def size(self, digest: str) -> int:
        return await self.store.size(digest)

    async def exists(self, digest: str) -> bool:
        return await self.store.exists(digest)

    async def delete(self, digest: str) -> None:
        await self.store.delete(digest)

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        return await self.store.delete_stale(digest, written_before)

    def location(self, digest: str) -> str:
        return self.store.location(digest)

    async def remove_interrupted_writes(self) -> int:
        return await self.store.remove_interrupted_writes()


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    opened = STORES[request.param](request, tmp_path)
    yield opened
    await opened.close()


async def old_blobs(store: BlobStore) -> tuple[str, str]:
    again, orphan = await store.put(AGAIN), await store.put(ORPHAN)
    await _age(store, again)
    await _age(store, orphan)
    return again, orphan


async def test_a_blob_put_again_after_the_listing_stays(
    database: Database, store: BlobStore
) -> None:
    again, orphan = await old_blobs(store)
    racing = AfterListing(store, lambda: store.put(AGAIN))
    report = await sweeper.sweep(database, racing, datetime.now(UTC), GRACE)
    assert (report.blobs_deleted, report.bytes_freed) == (1, len(ORPHAN))
    assert await store.read(again) == AGAIN
    assert not await store.exists(orphan)
    assert [info.digest async for info in store.list()] == [again]


async def test_a_blob_a_row_names_since_the_first_look_stays(
    database: Database, store: BlobStore
) -> None:
    again, orphan = await old_blobs(store)

    async def commit_a_message() -> None:
        async with database.transaction() as session:
            session.add(
                Message(
                    sender="agent@broker.example",
                    blob=again,
                    size=len(AGAIN),
                    message_id_header="<again@broker.example>",
                    subject="again",
                    received_at=datetime.now(UTC),
                )
            )

    racing = AfterListing(store, commit_a_message)
    report = await sweeper.sweep(database, racing, datetime.now(UTC), GRACE)
    assert report.blobs_deleted == 1
    assert await store.read(again) == AGAIN
    assert not await store.exists(orphan)
