"""The blob store: raw originals, attachments and generated documents, named by their sha256.

Everything outside the store knows a blob only by its digest and this interface, so where
blobs live (a local directory, an S3 bucket) is one class. The contract every
implementation keeps, checked for each by tests/store/test_blob_contract.py:

- `put_stream` returns the sha256 hex digest only once the whole blob is durable, and a
  failed put leaves nothing under that digest; putting the same bytes again is harmless.
  `put_file` keeps the same promises for a file whose digest its writer already knows.
- A put, even of bytes already stored, makes the blob young again (`BlobInfo.written_at`):
  the sweeper spares young blobs because an intake stores its blobs before it commits the
  rows that name them.
- Only a digest names a blob: any other name raises ValueError, before the store is asked.
- Reading, sizing or opening a blob that is not there raises BlobMissing; deleting it is a
  no-op (two sweepers may race).
- `delete_stale` deletes a blob only if no put reached it since a moment: the sweeper's
  delete, which must not take a blob an intake has just put again (gateway/store/sweeper.py).
- A store that cannot answer (a bucket unreachable, timing out, answering 5xx or refusing
  the credentials; a disk failing or unmounted) raises StoreUnavailable, never BlobMissing:
  whether the blob is there is then unknown, and callers say "try again later" (SMTP 451,
  HTTP 503, a delivery deferred), never "it is gone".
"""

from __future__ import annotations

import asyncio
import os
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import IO

CHUNK_SIZE = 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobMissing(FileNotFoundError):
    """A blob a row names is not in the store (deleted, or lost with a disk)."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} is not in the store")
        self.digest = digest


class StoreUnavailable(OSError):
    """The store could not be asked (unreachable, timed out, refused, failing): the blob may
    well be there, so this is temporary trouble, never a missing blob."""


def is_digest(name: str) -> bool:
    return _DIGEST.match(name) is not None


def checked_digest(name: str) -> str:
    """`name`, if it is a digest: a row's value never reaches a store as a key otherwise."""
    if not is_digest(name):
        raise ValueError(f"not a blob digest: {name!r}")
    return name


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob as the sweeper sees it."""

    digest: str
    size: int
    written_at: datetime  # the last put of these bytes, aware (UTC)


@dataclass(frozen=True)
class HashedFile:
    """An open file that nothing writes to any more, with the sha256 and size of its
    content: a big message as the SMTP front spooled it, hashed as it was written. A store
    on the same disk takes the file itself (gateway/store/local_blobs.py links it into
    place), so 10 MB of mail is not written to the disk a second time."""

    fd: int
    digest: str
    size: int


class BlobReader(ABC):
    """An open blob: its size and its bytes, from any position (for HTTP ranges)."""

    # What a reader going through the whole blob asks for at a time (an outgoing copy): a
    # window held in memory per reader, against one request per window.
    window = CHUNK_SIZE

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    async def read(self, start: int, length: int) -> bytes:
        """`length` bytes from `start`, fewer only where the blob ends."""

    async def stream(
        self, start: int, length: int, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """`length` bytes from `start` in chunks; OSError if the blob ends before."""
        position, end = start, start + length
        while position < end:
            chunk = await self.read(position, min(chunk_size, end - position))
            if not chunk:
                raise OSError(f"blob ended {end - position} bytes early")
            position += len(chunk)
            yield chunk

    def kernel_file(self) -> IO[bytes] | None:
        """A regular file the kernel can send from (sendfile), when the store has one;
        the web sends through it and streams otherwise."""
        return None

    def uncache(self) -> None:
        """The blob's bytes are not wanted again soon (a big original, sent): a store that
        holds them in the page cache lets them go. A relay keeps originals for days where
        Postfix deletes its queue file, and the pages of every kept original would crowd
        the cache until reclaimed. Never raises, and never waits: it runs between a copy
        sent and its outcome recorded. Nothing to do for a store without such a cache."""
        return None


class BlobStore(ABC):
    """Content-addressed, durable bytes; see the module for the contract."""

    @abstractmethod
    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        """The sha256 of everything `chunks` yields, once it is durably stored."""

    async def put(self, data: bytes) -> str:
        """The sha256 of `data`, once it is durably stored."""
        return await self.put_stream(_once(data))

    async def put_file(self, file: HashedFile) -> str:
        """The file's content stored as `put_stream` stores it: its sha256, once durable.
        The file is read as it is, from its start, whatever its position."""
        return await self.put_stream(_file_chunks(file))

    def takes_inline(self, size: int) -> bool:
        """Whether a writer may keep a blob of `size` bytes in its own database transaction
        (gateway/store/inline_blobs.py) instead of putting it here: only a store that reads
        such blobs back says yes."""
        return False

    def committed_inline(self, blobs: Mapping[str, bytes]) -> None:
        """Blobs a writer kept in its own transaction (`takes_inline`), just committed:
        a store that reads such blobs back may keep these at hand for their first reads."""
        return None

    @abstractmethod
    def open(self, digest: str) -> AbstractAsyncContextManager[BlobReader]:
        """The blob for reading, held open (and its size fixed) until the block ends."""

    async def read(self, digest: str) -> bytes:
        async with self.open(digest) as blob:
            return await blob.read(0, blob.size)

    async def read_start(self, digest: str, length: int) -> bytes:
        """The first `length` bytes (all of a shorter blob): a peek at a mail's header."""
        async with self.open(digest) as blob:
            return await blob.read(0, min(length, blob.size))

    @abstractmethod
    async def size(self, digest: str) -> int: ...

    @abstractmethod
    async def exists(self, digest: str) -> bool: ...

    @abstractmethod
    async def delete(self, digest: str) -> None: ...

    @abstractmethod
    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        """Delete the blob if its last put was before `written_before`: the bytes freed, or
        None when it was spared (put again since) or already gone. The age is read at the
        delete, not taken from an older listing."""

    @abstractmethod
    def list(self) -> AsyncIterator[BlobInfo]:
        """Every stored blob, in no particular order (for the sweeper)."""

    @abstractmethod
    def location(self, digest: str) -> str:
        """Where an operator finds the blob outside sealrelay: a file name, a URL."""

    async def where(self, digest: str) -> str:
        """Where the blob is held now, said for an operator (`sealrelay evidence`): its
        `location`, unless the store keeps some blobs elsewhere and must look."""
        return self.location(digest)

    async def check(self) -> None:
        """Returns when the store answers, StoreUnavailable when not: a cheap question,
        asked while the relay runs (gateway/store/health.py BlobHealth)."""
        return None

    async def remove_interrupted_writes(self) -> int:
        """Clear what writers killed mid-put left behind (at start-up and each sweep);
        how many went. What a living writer is still writing stays."""
        return 0

    async def close(self) -> None:
        """Let go of connections (an S3 client's); a local store holds none."""
        return None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _file_chunks(file: HashedFile) -> AsyncIterator[bytes]:
    position = 0
    while chunk := await asyncio.to_thread(os.pread, file.fd, CHUNK_SIZE, position):
        position += len(chunk)
        yield chunk
