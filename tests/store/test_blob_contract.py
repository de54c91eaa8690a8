"""The blob store contract (gateway/store/blobs.py): every implementation must pass this module.

An implementation is added to STORES; S3BlobStore runs against a real S3-compatible server
(tests/s3_server.py). The in-memory store below exists only to show that
the contract speaks of the interface and nothing local; the broken stores at the end show
that each check catches the fault it is there for.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store.blobs import (
    BlobInfo,
    BlobMissing,
    BlobReader,
    BlobStore,
    HashedFile,
    checked_digest,
)
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.s3_blobs import S3BlobStore
from tests.s3_server import S3Server

# The clocks of a store and of this process may disagree by a file system's tick.
SLACK = timedelta(seconds=2)
UNKNOWN = hashlib.sha256(b"never stored").hexdigest()
NOT_DIGESTS = ["../../etc/passwd", "ABC", "0" * 63, "g" * 64, "A" * 64]


class MemoryBlobStore(BlobStore):
    """Blobs in a dict: the smallest store that keeps the contract."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, datetime]] = {}

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        data = b"".join([chunk async for chunk in chunks])
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = (data, datetime.now(UTC))
        return digest

    def _data(self, digest: str) -> bytes:
        try:
            return self.blobs[checked_digest(digest)][0]
        except KeyError:
            raise BlobMissing(digest) from None

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        yield MemoryBlobReader(self._data(digest))

    async def size(self, digest: str) -> int:
        return len(self._data(digest))

    async def exists(self, digest: str) -> bool:
        return checked_digest(digest) in self.blobs

    async def delete(self, digest: str) -> None:
        self.blobs.pop(checked_digest(digest), None)

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        data, written_at = self.blobs.get(checked_digest(digest), (b"", written_before))
        if written_at >= written_before:
            return None
        del self.blobs[digest]
        return len(data)

    async def list(self) -> AsyncIterator[BlobInfo]:
        for digest, (data, written_at) in list(self.blobs.items()):
            yield BlobInfo(digest, len(data), written_at)

    def location(self, digest: str) -> str:
        return f"memory:{checked_digest(digest)}"


class MemoryBlobReader(BlobReader):
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]


STORES: dict[str, Callable[[pytest.FixtureRequest, Path], BlobStore]] = {
    "local": lambda request, tmp_path: LocalBlobStore(tmp_path / "blobs"),
    "memory": lambda request, tmp_path: MemoryBlobStore(),
    "s3": lambda request, tmp_path: _s3_store(request.getfixturevalue("s3_server")),
    "s3 with a prefix": lambda request, tmp_path: _s3_store(
        request.getfixturevalue("s3_server"), "relay/blobs"
    ),
}


def _s3_store(server: S3Server, prefix: str = "") -> S3BlobStore:
    return server.store(server.new_bucket(), prefix, spool_directory=None)


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    opened = STORES[request.param](request, tmp_path)
    yield opened
    await opened.close()


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)  # a real stream yields to the loop between chunks
        yield part


async def listed(store: BlobStore) -> dict[str, BlobInfo]:
    return {info.digest: info async for info in store.list()}


# --- the contract ----------------------------------------------------------------------------


async def test_put_stream_returns_the_sha256_of_all_chunks(store: BlobStore) -> None:
    parts = [b"first chunk, ", b"", b"second chunk, ", bytes(range(256)) * 4096]
    digest = await store.put_stream(chunks_of(*parts))
    whole = b"".join(parts)
    assert digest == hashlib.sha256(whole).hexdigest()
    assert await store.read(digest) == whole
    assert await store.size(digest) == len(whole)
    assert await store.exists(digest)


async def test_put_file_stores_the_whole_file_whatever_its_position(
    store: BlobStore, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 9000  # past a chunk, as a spooled message
    digest = hashlib.sha256(data).hexdigest()
    with open(tmp_path / "spooled", "w+b") as file:
        file.write(data)
        file.flush()  # left at its end, as the spool leaves it
        assert await store.put_file(HashedFile(file.fileno(), digest, len(data))) == digest
        assert await store.read(digest) == data
        assert await store.put_file(HashedFile(file.fileno(), digest, len(data))) == digest
    assert (tmp_path / "spooled").read_bytes() == data  # the writer's file is not consumed
    assert await store.read(digest) == data


async def test_put_of_bytes_is_the_same_blob(store: BlobStore) -> None:
    digest = await store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert await store.put_stream(chunks_of(b"hel", b"lo")) == digest
    assert await store.read(digest) == b"hello"
    assert list(await listed(store)) == [digest]


async def test_an_empty_blob_is_a_blob(store: BlobStore) -> None:
    digest = await store.put(b"")
    assert await store.read(digest) == b""
    assert await store.size(digest) == 0
    assert await store.exists(digest)


async def test_a_failing_stream_stores_nothing(store: BlobStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"the start of a mail whose client went away"
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        await store.put_stream(broken())
    assert await listed(store) == {}


async def test_open_reads_any_range(store: BlobStore) -> None:
    data = bytes(range(256)) * 40
    digest = await store.put(data)
    async with store.open(digest) as blob:
        assert blob.size == len(data)
        assert await blob.read(0, 10) == data[:10]
        assert await blob.read(1000, 300) == data[1000:1300]
        assert await blob.read(len(data) - 5, 100) == data[-5:]  # short only at the end
        assert await blob.read(len(data), 10) == b""
        streamed = [chunk async for chunk in blob.stream(7, 5000, chunk_size=1024)]
    assert b"".join(streamed) == data[7:5007]
    assert max(len(chunk) for chunk in streamed) <= 1024
    assert await store.read_start(digest, 20) == data[:20]
    assert await store.read_start(digest, 10**6) == data


async def test_a_blob_let_go_of_by_the_cache_reads_the_same(store: BlobStore) -> None:
    """`uncache` (a big original, sent) only ever costs a later read a trip to the disk."""
    data = bytes(range(256)) * 40
    digest = await store.put(data)
    async with store.open(digest) as blob:
        assert await blob.read(0, len(data)) == data
        blob.uncache()
        assert await blob.read(0, len(data)) == data
    assert await store.read(digest) == data


async def test_a_missing_blob_raises_blob_missing(store: BlobStore) -> None:
    assert not await store.exists(UNKNOWN)
    with pytest.raises(BlobMissing) as missing:
        await store.read(UNKNOWN)
    assert missing.value.digest == UNKNOWN
    with pytest.raises(BlobMissing):
        await store.size(UNKNOWN)
    with pytest.raises(BlobMissing):
        async with store.open(UNKNOWN):
            pass
    await store.delete(UNKNOWN)  # nothing to delete is no error


async def test_delete_removes_one_blob(store: BlobStore) -> None:
    kept, gone = await store.put(b"kept"), await store.put(b"gone")
    await store.delete(gone)
    assert not await store.exists(gone)
    assert await store.exists(kept)
    with pytest.raises(BlobMissing):
        await store.read(gone)
    assert set(await listed(store)) == {kept}


async def test_list_names_every_blob_with_its_size_and_age(store: BlobStore) -> None:
    assert await listed(store) == {}
    before = datetime.now(UTC)
    contents = [b"a", b"bb" * 1000, b"ccc" * 100_000]
    digests = [await store.put(content) for content in contents]
    after = datetime.now(UTC)
    infos = await listed(store)
    assert set(infos) == set(digests)
    for digest, content in zip(digests, contents, strict=True):
        assert infos[digest].size == len(content)
        written = infos[digest].written_at
        assert written.tzinfo is not None
        assert before - SLACK <= written <= after + SLACK


async def test_a_put_again_makes_a_blob_young(store: BlobStore) -> None:
    """The sweeper deletes old blobs nothing names; an intake that stores bytes the store
    already has commits the rows naming them afterwards, so the blob must count as new."""
    digest = await store.put(b"an attachment sent twice, months apart")
    first = (await listed(store))[digest].written_at
    await _age(store, digest)
    assert (await listed(store))[digest].written_at < first - timedelta(days=1)
    before = datetime.now(UTC)
    await store.put(b"an attachment sent twice, months apart")
    assert (await listed(store))[digest].written_at >= before - SLACK
    await _age(store, digest)
    await store.put_stream(chunks_of(b"an attachment sent twice, ", b"months apart"))
    assert (await listed(store))[digest].written_at >= before - SLACK


async def test_delete_stale_takes_only_a_blob_not_put_since(store: BlobStore) -> None:
    """The sweeper's delete judges the age at the delete, not by an older listing."""
    data = b"an attachment the sweep looks at"
    digest = await store.put(data)
    day_ago = datetime.now(UTC) - timedelta(days=1)
    assert await store.delete_stale(digest, day_ago) is None  # put since: spared
    assert await store.read(digest) == data
    await _age(store, digest)
    assert await store.delete_stale(digest, day_ago) == len(data)
    assert not await store.exists(digest)
    assert await store.delete_stale(digest, day_ago) is None  # gone already: no error
    assert await store.delete_stale(UNKNOWN, day_ago) is None
    assert await listed(store) == {}


@pytest.mark.parametrize("name", NOT_DIGESTS)
async def test_only_digests_name_blobs(store: BlobStore, name: str) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.read(name),
        lambda: store.size(name),
        lambda: store.exists(name),
        lambda: store.delete(name),
        lambda: store.delete_stale(name, datetime.now(UTC)),
        lambda: store.read_start(name, 10),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            await call()
    with pytest.raises(ValueError):
        store.location(name)


async def test_location_names_each_blob_apart(store: BlobStore) -> None:
    one, two = await store.put(b"one"), await store.put(b"two")
    assert store.location(one) != store.location(two)
    assert one in store.location(one)


async def test_concurrent_puts_of_the_same_bytes_store_one_blob(store: BlobStore) -> None:
    data = b"the same offer from two sessions at once" * 10_000
    digests = await asyncio.gather(*(store.put(data) for _ in range(8)))
    assert set(digests) == {hashlib.sha256(data).hexdigest()}
    assert await store.read(digests[0]) == data
    assert len(await listed(store)) == 1
    assert await store.remove_interrupted_writes() == 0  # nothing was interrupted


async def _age(store: BlobStore, digest: str) -> None:
    """Make a blob look written 30 days ago, as each store records it."""
    month_ago = datetime.now(UTC) - timedelta(days=30)
    if isinstance(store, LocalBlobStore):
        stamp = month_ago.timestamp()
        os.utime(store.location(digest), (stamp, stamp))
    elif isinstance(store, S3BlobStore):
        server = S3Server(store.endpoint_url or "")
        server.set_written_at(store.bucket, store.prefix + digest, month_ago)
    elif isinstance(store, MemoryBlobStore):
        store.blobs[digest] = (store.blobs[digest][0], month_ago)
    else:
        raise AssertionError(f"teach _age how {type(store).__name__} records age")


# --- the contract fails a store that breaks it ------------------------------------------------


class FirstChunkDigest(MemoryBlobStore):
    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        parts = [chunk async for chunk in chunks]
        digest = hashlib.sha256(parts[0]).hexdigest()
        self.blobs[digest] = (b"".join(parts), datetime.now(UTC))
        return digest


class KeepsHalfWrittenBlobs(MemoryBlobStore):
    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        data = b""
        try:
            async for chunk in chunks:
                data += chunk
        finally:
            self.blobs[hashlib.sha256(data).hexdigest()] = (data, datetime.now(UTC))
        return hashlib.sha256(data).hexdigest()


class RangesFromTheStart(MemoryBlobStore):
    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        yield FromTheStartReader(self._data(digest))


class FromTheStartReader(MemoryBlobReader):
    async def read(self, start: int, length: int) -> bytes:
        return self.data[:length]


class MissingReadsAsEmpty(MemoryBlobStore):
    def _data(self, digest: str) -> bytes:
        return self.blobs.get(checked_digest(digest), (b"", datetime.now(UTC)))[0]


class DeleteForgetsNothing(MemoryBlobStore):
    async def delete(self, digest: str) -> None:
        checked_digest(digest)


class KeepsTheFirstAge(MemoryBlobStore):
    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        data = b"".join([chunk async for chunk in chunks])
        digest = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(digest, (data, datetime.now(UTC)))
        return digest


class ListsNaiveTimes(MemoryBlobStore):
    async def list(self) -> AsyncIterator[BlobInfo]:
        async for info in super().list():
            yield BlobInfo(info.digest, info.size, info.written_at.replace(tzinfo=None))


class DeletesWhateverItsAge(MemoryBlobStore):
    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        data = self.blobs.pop(checked_digest(digest), None)
        return None if data is None else len(data[0])


class TakesAnyName(MemoryBlobStore):
    async def exists(self, digest: str) -> bool:
        return digest in self.blobs


BROKEN: dict[str, tuple[type[MemoryBlobStore], Callable[[BlobStore], Awaitable[None]]]] = {
    "digest of the first chunk": (
        FirstChunkDigest,
        test_put_stream_returns_the_sha256_of_all_chunks,
    ),
    "half-written blob kept": (KeepsHalfWrittenBlobs, test_a_failing_stream_stores_nothing),
    "ranges read from the start": (RangesFromTheStart, test_open_reads_any_range),
    "missing reads as empty": (MissingReadsAsEmpty, test_a_missing_blob_raises_blob_missing),
    "delete forgets nothing": (DeleteForgetsNothing, test_delete_removes_one_blob),
    "a put again keeps the old age": (KeepsTheFirstAge, test_a_put_again_makes_a_blob_young),
    "ages without a zone": (ListsNaiveTimes, test_list_names_every_blob_with_its_size_and_age),
    "a blob put since deleted": (
        DeletesWhateverItsAge,
        test_delete_stale_takes_only_a_blob_not_put_since,
    ),
    "any name taken": (
        TakesAnyName,
        functools.partial(test_only_digests_name_blobs, name="../../etc/passwd"),
    ),
}


@pytest.mark.parametrize("fault", sorted(BROKEN))
async def test_the_contract_fails_a_broken_store(fault: str) -> None:
    broken, check = BROKEN[fault]
    await check(MemoryBlobStore())  # the same check passes on a sound store
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        await check(broken())
