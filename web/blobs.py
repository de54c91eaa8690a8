"""Blobs into HTTP responses, from whichever store holds them.

A store with a local file hands it over (`BlobReader.kernel_file`) and the kernel sends it
(web/kernel_send.py: sendfile on asyncio and on uvloop); any other store, or a connection
the kernel cannot send to (TLS), is streamed in chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from gateway.store.blobs import CHUNK_SIZE, BlobReader, BlobStore
from web.kernel_send import kernel_send


async def send_blob(
    request: web.Request, response: web.StreamResponse, blob: BlobReader, start: int, length: int
) -> None:
    """`length` bytes of `blob` from `start` into a prepared response."""
    file = blob.kernel_file()
    if file is not None and await kernel_send(request, file, start, length):
        return
    async for chunk in blob.stream(start, length):
        await response.write(chunk)


# The threads that pull a blocking iterator of PulledBlobs (the zip), kept apart from the
# loop's default executor: a pull waits for the store on the event loop, and the store may
# read in the default executor's threads, so pulls there could take every thread a read needs.
_PULLERS = ThreadPoolExecutor(thread_name_prefix="blob-pull")


async def send_pulled(response: web.StreamResponse, chunks: Iterator[bytes]) -> None:
    """Drain a blocking iterator (the zip) in a puller thread, about CHUNK_SIZE at a time."""

    def take() -> bytes:
        parts, total = [], 0
        for part in chunks:
            parts.append(part)
            total += len(part)
            if total >= CHUNK_SIZE:
                break
        return b"".join(parts)

    loop = asyncio.get_running_loop()
    while chunk := await loop.run_in_executor(_PULLERS, take):
        await response.write(chunk)


class PulledBlob:
    """A blob as a blocking iterator of chunks, for a writer that pulls its input in a
    thread (the zip, through `send_pulled`) while the store works on the event loop."""

    def __init__(self, blobs: BlobStore, digest: str, loop: asyncio.AbstractEventLoop) -> None:
        self.blobs = blobs
        self.digest = digest
        self.loop = loop

    def __iter__(self) -> Iterator[bytes]:
        chunks = _chunks_of(self.blobs, self.digest)
        try:
            while (chunk := self._next(chunks)) is not None:
                yield chunk
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to close
                asyncio.run_coroutine_threadsafe(chunks.aclose(), self.loop)

    def _next(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        return asyncio.run_coroutine_threadsafe(_next_or_none(chunks), self.loop).result()


async def _chunks_of(blobs: BlobStore, digest: str) -> AsyncGenerator[bytes]:
    async with blobs.open(digest) as blob:
        async for chunk in blob.stream(0, blob.size):
            yield chunk


async def _next_or_none(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)
