"""A big outgoing copy sent from its stored blob in pieces, never whole in memory.

A 10 MB copy built whole costs 20 MB per delivery slot (the stored bytes, then the copy with
the new fields in front). Here the blob is read a window at a time, and memory per copy is
a window or two, whatever the message's size. Small copies are still built whole
(`prepare`): one read.

A submitted message's original, the copy nearly every big message leaves as, is read once:
the intake checked its line ends and kept its DKIM body hash (`Message.body_hash`), so the
new header block is known before its body is read, and its sha256 proves as it is sent that
these are the bytes the intake checked (`DigestProof`). Any other blob (a materialized copy)
is read twice: once for the body hash and to find a bare CR or LF before a byte leaves, then
as it is sent, each read checked against the first by its Adler-32 (`WindowSums`).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from gateway.mail import dkim, headers, lines
from gateway.mail.loop_mark import LoopMarks
from gateway.mail.outgoing import Head, Signer, author_domain, prepare
from gateway.store.blobs import BlobReader, BlobStore
from gateway.store.models import Message, MessageKind

# Copies up to this size are built whole; a bigger one's header block must lie within it.
WHOLE = 256 * 1024


class BlobChanged(OSError):
    """The blob read as the copy is sent is not what was checked (changed behind the
    store's back): what would leave is not what was signed and checked."""


class Reads(Protocol):
    """How a StoredCopy reads its blob as it is sent, and proves each read."""

    def of(self, blob: BlobReader) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class StoredCopy:
    """The new header block (signature, trace fields) and the stored copy after it, open.

    Only valid while the blob is open (`outgoing` holds it). `bare_line_end` is where the
    first bare CR or LF is in the copy (-1: none), so that such a copy is refused before a
    byte is written, as a whole one is. `ends_in_crlf` lets a BDAT chunk's size be said
    before the octets are read. `reads` reads the blob and raises BlobChanged where the
    bytes are not the ones checked. `utf8_header`: the copy's header block holds UTF-8
    (RFC 6532), which goes with SMTPUTF8 where the upstream offers it."""

    head: bytes
    blob: BlobReader
    bare_line_end: int
    ends_in_crlf: bool
    reads: Reads
    utf8_header: bool = False

    def __len__(self) -> int:
        return len(self.head) + self.blob.size

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The copy's bytes, the blob's a read at a time; OSError (StoreUnavailable,
        BlobMissing, BlobChanged) when the store fails or the blob is not as it was."""
        yield self.head
        async for chunk in self.reads.of(self.blob):
            yield chunk


@dataclass(frozen=True)
class WindowSums:
    """Reads of the ranges a first pass read (`first` octets, then `window` at a time),
    each with the Adler-32 the first pass saw (`sums`): the bytes sent are the bytes hashed
    and checked, at a few ms per 10 MB instead of a second scan."""

    sums: tuple[int, ...]
    first: int
    window: int

    async def of(self, blob: BlobReader) -> AsyncIterator[bytes]:
        sums, position = iter(self.sums), 0
        async for chunk in _reads(blob, 0, self.window, first=self.first):
            if zlib.adler32(chunk) != next(sums, None):
                raise BlobChanged(f"the stored copy changed at byte {position} since it was read")
            position += len(chunk)
            yield chunk
        if next(sums, None) is not None:
            raise BlobChanged(f"the stored copy ended at byte {position} since it was read")


@dataclass(frozen=True)
class DigestProof:
    """Reads of a blob whose name is its sha256 (`digest`), `first` (its first octets, read
    already for the header block) then `window` at a time. The last read is held back until
    the digest is proved, so a blob that is not what it names never leaves whole: the data
    stops short of its end and the upstream never takes it. `tail`: the blob's last octets
    as seen before, which said the copy's size on the wire."""

    digest: str
    first: bytes
    window: int
    tail: bytes

    async def of(self, blob: BlobReader) -> AsyncIterator[bytes]:
        proof = hashlib.sha256(self.first)
        held = self.first
        ending = held[-2:]
        async for chunk in _reads(blob, len(self.first), self.window):
            proof.update(chunk)
            ending = (ending + chunk[-2:])[-2:]
            yield held
            held = chunk
        if proof.hexdigest() != self.digest or ending != self.tail:
            raise BlobChanged(f"the stored blob {self.digest} does not hold the bytes it names")
        yield held


def window_sums(data: bytes, first: int, window: int) -> WindowSums:
    """The reads of a StoredCopy over `data` in a `first` read then `window` at a time."""
    starts = [0, *range(first, len(data), window)] if data else []
    sums = tuple(
        zlib.adler32(data[start : first if index == 0 else start + window])
        for index, start in enumerate(starts)
    )
    return WindowSums(sums, first, window)


Outgoing = bytes | StoredCopy


async def keep(data: Outgoing, blobs: BlobStore) -> str:
    """Keep the copy as it leaves (a released original's signed copy): its digest."""
    if isinstance(data, StoredCopy):
        return await blobs.put_stream(data.chunks())
    return await blobs.put(data)


def intake_body_hash(raw: bytes, signing_domains: Collection[str]) -> str | None:
    """What a submitted original keeps as its `Message.body_hash`: the DKIM body hash of
    one big enough to be sent from its blob whose From domain is in `signing_domains`
    (lower case), so that `build` reads it once. Computed while the intake holds it in
    memory."""
    if len(raw) <= WHOLE:
        return None
    domain = author_domain(headers.fields_of(raw))
    if domain is None or domain not in signing_domains:
        return None
    _, body_start = headers.split_offsets(raw)
    return dkim.body_hash(raw, body_start)


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
        blob.uncache()  # sent (or deferred): a retry may read it from the disk


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
    end within the first WHOLE bytes (no real mail), else a StoredCopy. `window`: the size
    of each read (the store's own when None: 256 KiB from a file, 1 MiB from S3, one GET
    each); `now`: the signature's t=, if not now; `digest`: the blob's name.

    A submitted message's original (`digest` is its `blob`) passed the intake's line-end
    check under that name (Pipeline.receive), and the intake kept its body hash when it is
    signed: it is read once, as it is sent, proved by its digest (DigestProof); one stored
    before body hashes were kept is read once more first, for the body hash alone. Any
    other copy takes a first pass for the body hash and the line ends (`_first_pass`)."""
    first = await blob.read(0, min(blob.size, WHOLE))
    offsets = headers.split_offsets_at_start(first)
    if len(first) == blob.size or offsets is None:
        if len(first) < blob.size:
            first = await blob.read(0, blob.size)
        return prepare(first, message, hostname, signer, loop, now=now)
    header_end, body_start = offsets
    head = Head.of(first[:header_end], message, hostname, signer, loop)
    window = window or blob.window
    if digest is None or digest != message.blob or message.kind != MessageKind.SUBMITTED:
        return await _first_pass(blob, head, first, body_start, window, now)
    bh = message.body_hash
    if head.key is not None and bh is None:
        bh = await _body_hash(blob, first, body_start, window)
    tail = await blob.read(blob.size - 2, 2)
    proof = DigestProof(digest, first, window, tail)
    fields = head.fields(bh, now=now)
    return StoredCopy(fields, blob, -1, tail == b"\r\n", proof, not head.header_block.isascii())


async def _body_hash(blob: BlobReader, first: bytes, body_start: int, window: int) -> str:
    """The body hash of a blob read after its `first` octets, whose body starts at
    `body_start`."""
    body = dkim.BodyHash()
    body.update(first[body_start:])
    async for chunk in _reads(blob, len(first), window):
        body.update(chunk)
    return body.value()


async def _first_pass(
    blob: BlobReader, head: Head, first: bytes, body_start: int, window: int, now: int | None
) -> StoredCopy:
    """The body hash and the first bare line end, in reads of exactly the ranges the copy
    is sent in."""
    scan = lines.LineEndScan()
    body = dkim.BodyHash() if head.key is not None else None
    scan.update(first)
    if body is not None:
        body.update(first[body_start:])
    sums = [zlib.adler32(first)]
    start = len(first)
    tail = first[-2:]
    del first
    async for chunk in _reads(blob, start, window):
        scan.update(chunk)
        if body is not None:
            body.update(chunk)
        sums.append(zlib.adler32(chunk))
        tail = (tail + chunk[-2:])[-2:]
    fields = head.fields(body.value() if body is not None else None, now=now)
    found = scan.end() + len(fields) if scan.end() != -1 else -1
    reads = WindowSums(tuple(sums), start, window)
    utf8 = not head.header_block.isascii()
    return StoredCopy(fields, blob, found, tail == b"\r\n", reads, utf8)


async def _reads(
    blob: BlobReader, start: int, window: int, *, first: int | None = None
) -> AsyncIterator[bytes]:
    """The blob from `start` to its end, `window` octets a read (`first` for the first one,
    if given; the last may be shorter), so that every pass reads the same ranges: each one
    GET from S3. A read that comes back short means the blob changed."""
    position, length = start, first or window
    while position < blob.size:
        length = min(length, blob.size - position)
        chunk = await blob.read(position, length)
        if len(chunk) != length:
            raise BlobChanged(f"the stored copy ended at byte {position + len(chunk)}")
        yield chunk
        position, length = position + length, window
