"""A big outgoing copy sent from its stored blob in pieces, never whole in memory.

A 10 MB copy built whole costs 20 MB per delivery slot (the stored bytes, then the copy with
the new fields in front). Here the blob is read twice through the store's `open`, a window
at a time: once for the DKIM body hash (and to find a bare CR or LF before a byte leaves),
then again as it is sent, after the new header block. Memory per copy is the window,
whatever the message's size. Small copies are still built whole (`prepare`): one read, and
no second pass over the blob.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.mail import dkim, headers, lines
from gateway.mail.loop_mark import LoopMarks
from gateway.mail.outgoing import Head, Signer, prepare
from gateway.store.blobs import CHUNK_SIZE, BlobReader, BlobStore
from gateway.store.models import Message

# Copies up to this size are built whole; a bigger one's header block must lie within it.
WHOLE = 256 * 1024


@dataclass(frozen=True)
class StoredCopy:
    """The new header block (signature, trace fields) and the stored copy after it, open.

    Only valid while the blob is open (`outgoing` holds it). `bare_line_end` is where the
    first bare CR or LF is in the copy, found in the first pass (-1: none), so that such a
    copy is refused before a byte is written, as a whole one is."""

    head: bytes
    blob: BlobReader
    bare_line_end: int
    window: int = CHUNK_SIZE  # bytes per read

    def __len__(self) -> int:
        return len(self.head) + self.blob.size

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The copy's bytes, the blob's a window at a time; OSError (StoreUnavailable,
        BlobMissing) when the store fails or the blob ends early."""
        yield self.head
        async for chunk in self.blob.stream(0, self.blob.size, self.window):
            yield chunk


Outgoing = bytes | StoredCopy


async def keep(data: Outgoing, blobs: BlobStore) -> str:
    """Keep the copy as it leaves (a released original's signed copy): its digest."""
    if isinstance(data, StoredCopy):
        return await blobs.put_stream(data.chunks())
    return await blobs.put(data)


@asynccontextmanager
async def outgoing(
    blobs: BlobStore,
    digest: str,
    message: Message,
    hostname: str,
    signer: Signer,
    loop: LoopMarks | None = None,
) -> AsyncIterator[Outgoing]:
    """The copy of blob `digest` as it leaves, for the block's length.

    A message received small is read whole at once (one GET from S3, no HEAD); its copies
    are about its size (a materialized copy differs by a block of text)."""
    if message.size <= WHOLE:
        yield prepare(await blobs.read(digest), message, hostname, signer, loop)
        return
    async with blobs.open(digest) as blob:
        yield await build(blob, message, hostname, signer, loop)


async def build(
    blob: BlobReader,
    message: Message,
    hostname: str,
    signer: Signer,
    loop: LoopMarks | None = None,
    *,
    window: int | None = None,
    now: int | None = None,
) -> Outgoing:
    """The copy of an open blob: built whole when it is small or its header block does not
    end within the first WHOLE bytes (no real mail), else a StoredCopy after one pass
    over the blob for the body hash and the line ends. `window`: the size of each read,
    in this pass and as the copy is sent (the store's own when None: 256 KiB from a file,
    1 MiB from S3, one GET each); `now`: the signature's t=, if not now."""
    first = await blob.read(0, min(blob.size, WHOLE))
    offsets = headers.split_offsets_at_start(first)
    if len(first) == blob.size or offsets is None:
        if len(first) < blob.size:
            first = await blob.read(0, blob.size)
        return prepare(first, message, hostname, signer, loop, now=now)
    header_end, body_start = offsets
    head = Head.of(first[:header_end], message, hostname, signer, loop)
    scan = lines.LineEndScan()
    body = dkim.BodyHash() if head.key is not None else None
    scan.update(first)
    if body is not None:
        body.update(first[body_start:])
    start = len(first)
    del first
    window = window or blob.window
    async for chunk in blob.stream(start, blob.size - start, window):
        scan.update(chunk)
        if body is not None:
            body.update(chunk)
    fields = head.fields(body.value() if body is not None else None, now=now)
    found = scan.end()
    return StoredCopy(fields, blob, found + len(fields) if found != -1 else -1, window)
