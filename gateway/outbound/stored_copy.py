"""A big outgoing copy sent from its stored blob in pieces, never whole in memory.

A 10 MB copy built whole costs 20 MB per delivery slot (the stored bytes, then the copy with
the new fields in front). Here the blob is read twice through the store's `open`, a window
at a time: once for the DKIM body hash (and to find a bare CR or LF before a byte leaves),
then again as it is sent, after the new header block, each read checked against the first
by its Adler-32. Memory per copy is the window,
whatever the message's size. Small copies are still built whole (`prepare`): one read, and
no second pass over the blob.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.mail import dkim, headers, lines
from gateway.mail.loop_mark import LoopMarks
from gateway.mail.outgoing import Head, Signer, prepare
from gateway.store.blobs import BlobReader, BlobStore
from gateway.store.models import Message, MessageKind

# Copies up to this size are built whole; a bigger one's header block must lie within it.
WHOLE = 256 * 1024


class BlobChanged(OSError):
    """The blob read as the copy is sent is not what the first read saw (changed behind the
    store's back): what would leave is not what was signed and checked."""


@dataclass(frozen=True)
class StoredCopy:
    """The new header block (signature, trace fields) and the stored copy after it, open.

    Only valid while the blob is open (`outgoing` holds it). `bare_line_end` is where the
    first bare CR or LF is in the copy, found in the first pass (-1: none), so that such a
    copy is refused before a byte is written, as a whole one is. The second read goes over
    the same ranges as the first (`first` octets, then `window` at a time) and each must
    have the Adler-32 the first pass saw (`sums`): the bytes sent are the bytes hashed and
    checked, at a few ms per 10 MB instead of a second scan. `ends_in_crlf`, seen in the
    first pass too, lets a BDAT chunk's size be said before its octets are read."""

    head: bytes
    blob: BlobReader
    bare_line_end: int
    sums: tuple[int, ...]
    first: int
    window: int
    ends_in_crlf: bool

    def __len__(self) -> int:
        return len(self.head) + self.blob.size

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The copy's bytes, the blob's a read at a time; OSError (StoreUnavailable,
        BlobMissing, BlobChanged) when the store fails or the blob is not as it was."""
        yield self.head
        position = 0
        for index, expected in enumerate(self.sums):
            length = min(self.first if index == 0 else self.window, self.blob.size - position)
            chunk = await self.blob.read(position, length)
            if len(chunk) != length or zlib.adler32(chunk) != expected:
                raise BlobChanged(f"the stored copy changed at byte {position} since it was read")
            position += length
            yield chunk


def window_sums(data: bytes, first: int, window: int) -> tuple[int, ...]:
    """The `sums` of a StoredCopy over `data`, read as its `first` and `window` say."""
    starts = [0, *range(first, len(data), window)] if data else []
    return tuple(
        zlib.adler32(data[start : first if index == 0 else start + window])
        for index, start in enumerate(starts)
    )


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
        yield await build(blob, message, hostname, signer, loop, digest=digest)


async def build(
    blob: BlobReader,
    message: Message,
    hostname: str,
    signer: Signer,
    loop: LoopMarks | None = None,
    *,
    window: int | None = None,
    now: int | None = None,
    digest: str | None = None,
) -> Outgoing:
    """The copy of an open blob: built whole when it is small or its header block does not
    end within the first WHOLE bytes (no real mail), else a StoredCopy after one pass
    over the blob for the body hash and the line ends. `window`: the size of each read,
    in this pass and as the copy is sent (the store's own when None: 256 KiB from a file,
    1 MiB from S3, one GET each); `now`: the signature's t=, if not now; `digest`: the
    blob's name.

    A submitted message's original (`digest` is its `blob`) passed the intake's line-end
    check under that name (Pipeline.receive): here its sha256 proves that these are those
    bytes, for a tenth of the CPU of scanning them again (1 against 10 ms per 10 MB), and
    bytes that are not raise BlobChanged."""
    first = await blob.read(0, min(blob.size, WHOLE))
    offsets = headers.split_offsets_at_start(first)
    if len(first) == blob.size or offsets is None:
        if len(first) < blob.size:
            first = await blob.read(0, blob.size)
        return prepare(first, message, hostname, signer, loop, now=now)
    header_end, body_start = offsets
    head = Head.of(first[:header_end], message, hostname, signer, loop)
    scan: lines.LineEndScan | _Verify = lines.LineEndScan()
    if digest is not None and digest == message.blob and message.kind == MessageKind.SUBMITTED:
        scan = _Verify(digest)
    body = dkim.BodyHash() if head.key is not None else None
    scan.update(first)
    if body is not None:
        body.update(first[body_start:])
    sums = [zlib.adler32(first)]
    start = position = len(first)
    tail = first[-2:]
    del first
    window = window or blob.window
    while position < blob.size:  # reads of exactly these ranges, as chunks() reads them
        length = min(window, blob.size - position)
        chunk = await blob.read(position, length)
        if len(chunk) != length:
            raise BlobChanged(f"the stored copy ended at byte {position + len(chunk)}")
        scan.update(chunk)
        if body is not None:
            body.update(chunk)
        sums.append(zlib.adler32(chunk))
        tail = (tail + chunk[-2:])[-2:]
        position += length
    fields = head.fields(body.value() if body is not None else None, now=now)
    found = scan.end() + len(fields) if scan.end() != -1 else -1
    return StoredCopy(fields, blob, found, tuple(sums), start, window, tail == b"\r\n")


class _Verify:
    """In place of a LineEndScan for bytes checked before under their digest: -1 (no bare
    line end) once the bytes prove to be those."""

    def __init__(self, digest: str) -> None:
        self._digest = digest
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def end(self) -> int:
        if self._hash.hexdigest() != self._digest:
            raise BlobChanged(f"the stored blob {self._digest} does not hold the bytes it names")
        return -1
