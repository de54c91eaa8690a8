"""SMTP DATA read in large pieces instead of one await per line, spooled to a file.

aiosmtpd keeps every line of DATA as its own object and joins them at the end: for a 10 MB
message that is ~4x its size in memory and most of a minimal relay's CPU (DESIGN.md,
measured facts). Here the stream is searched for the end of data at C speed (`_spool` says
how); the pieces are gathered into windows of `WINDOW` octets, and each window's complete
lines are checked for length, searched for a bare CR or LF and dot-unstuffed
(`gateway.mail.lines`) while they are still in the CPU's cache: the pipeline's own pass for
bare line ends, over 10 MB read back cold, took about 21 ms of the relay's CPU, the same
search here about 15 ms (py-spy, bench/relay.py). The first `KEPT` octets stay in memory
(small mail costs no file); past them everything goes to a nameless spool file, hashed
(sha256) as it is written, so that the blob store can take the file as the message's
original instead of a second copy of its bytes (`Spooled.hashed_file`). So a session holds
a window or two while its client sends (a piece is at most `WINDOW` octets, though the
reader's buffer may hold more), not the message: with 20 big messages arriving at once that
was 20 whole messages in memory (issue 18). The message is read back in one piece only when
the front hands it on (gateway/fronts/byte_budget.py says when).

The end is only ever CRLF "." CRLF: a bare LF or CR before the dot does not end the data
(no SMTP smuggling), and the pipeline refuses such mail anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.mail import lines
from gateway.store.blobs import HashedFile

WINDOW = 256 * 1024
KEPT = 256 * 1024  # octets kept in memory before a spool file is made
_END = b".\r\n"
_DOT = b"."
_DOTS_APART = 4096  # a dot found sooner than this: text; ".\r\n" is searched for instead


@dataclass(frozen=True)
class DataResult:
    content: bytes
    too_big: bool = False
    line_too_long: bool = False


class _Spool:
    """Complete lines, checked and unstuffed, are kept; a line's start waits for its end in
    `carry` (at most the line limit: a longer one is refused at once). The first `KEPT`
    octets stay in memory, so that small mail costs no file; past them everything goes to
    a nameless file in `spool_dir`."""

    def __init__(self, line_limit: int, spool_dir: Path | None) -> None:
        self.line_limit = line_limit
        self.spool_dir = spool_dir
        self.carry = bytearray()
        self.line_too_long = False
        self.bare_line_end = False  # a CR not before an LF, or an LF not after a CR
        self.kept: list[bytes] = []
        self.size = 0
        self.file: IO[bytes] | None = None
        self.pending: list[bytes | memoryview] = []  # for the file, a window at a time
        self.pending_size = 0
        self.hash = hashlib.sha256()  # of what went to the file

    async def feed(self, piece: bytes, end: int) -> None:
        """`piece[:end]`, which continues what came before. Its lines are taken where they
        lie in `piece`, not copied into a block first; only a line begun in the piece
        before is joined to its end."""
        if self.line_too_long or end == 0:
            return
        last = piece.rfind(b"\n", 0, end)
        if last == -1:
            self.carry += memoryview(piece)[:end]
            self.line_too_long = len(self.carry) > self.line_limit
            return
        start = 0
        if self.carry:
            start = piece.find(b"\n", 0, end) + 1
            self.carry += memoryview(piece)[:start]
            await self._take(bytes(self.carry), 0, len(self.carry))
        self.carry = bytearray(memoryview(piece)[last + 1 : end])
        self.line_too_long = self.line_too_long or len(self.carry) > self.line_limit
        await self._take(piece, start, last + 1)

    async def _take(self, data: bytes, start: int, end: int) -> None:
        """`data[start:end]`, whole lines: a bare CR or LF cannot straddle two of these,
        and unstuffing takes only dots after an LF."""
        if self.line_too_long or start == end:
            return
        if lines.has_line_longer_than(data, self.line_limit, start, end):
            self.line_too_long = True
            return
        if not self.bare_line_end:
            self.bare_line_end = lines.bare_line_end(data, start=start, end=end) != -1
        await self._write(_unstuffed_pieces(data, start, end))

    async def _write(self, pieces: list[bytes | memoryview]) -> None:
        self.size += sum(len(piece) for piece in pieces)
        file = self.file
        if file is None:
            self.kept.extend(bytes(piece) for piece in pieces)
            if self.size <= KEPT:
                return
            self.file = await asyncio.to_thread(_nameless_file, self.spool_dir)
            pieces, self.kept = list(self.kept), []
        # one write per window, not per piece: lines of "." make pieces of a few octets;
        # views of the (immutable) pieces read, not copies
        self.pending.extend(pieces)
        self.pending_size += sum(len(piece) for piece in pieces)
        if self.pending_size >= WINDOW:
            await self._flush()

    async def _flush(self) -> None:
        if self.file is not None and self.pending:
            pending, self.pending, self.pending_size = self.pending, [], 0
            await asyncio.to_thread(_write_out, self.file, self.hash, pending)

    async def read(self) -> bytes:
        if self.file is None:
            return b"".join(self.kept)
        await self._flush()
        return await asyncio.to_thread(_read_back, self.file)

    def close(self) -> None:
        self.kept = []
        self.pending = []
        if self.file is not None:
            self.file.close()


def _unstuffed_pieces(data: bytes, start: int, end: int) -> list[bytes | memoryview]:
    """`data[start:end]` (whole lines) without the stuffing dots, as views of `data` where
    they are few."""
    dots = lines.stuffing_dots(data, start, end=end)
    if dots is None:
        return [lines.unstuffed(data[start:end])]
    positions = [start, *dots] if data.startswith(b".", start) else dots
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    for position in positions:
        pieces.append(view[start:position])
        start = position + 1
    pieces.append(view[start:end])
    return pieces


class Spooled:
    """DATA as received, in memory or its spool file until `read` takes it whole; `close`
    ends the file (it has no name, so nothing is left behind)."""

    def __init__(self, spool: _Spool, too_big: bool = False) -> None:
        self._spool = spool
        self.too_big = too_big
        self.line_too_long = spool.line_too_long and not too_big
        self.size = 0 if too_big or spool.line_too_long else spool.size
        self.bare_line_end = spool.bare_line_end  # in what `read` gives

    async def read(self) -> bytes:
        return await self._spool.read()

    def hashed_file(self) -> HashedFile | None:
        """The spool file with the digest of what `read` gave, for the blob store to take
        (None when the message stayed in memory). Valid until `close`."""
        spool = self._spool
        if spool.file is None or spool.pending:
            return None
        return HashedFile(spool.file.fileno(), spool.hash.hexdigest(), spool.size)

    def close(self) -> None:
        self._spool.close()


async def spool_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    line_limit: int,
    spool_dir: Path | None = None,
) -> Spooled:
    """Everything up to CRLF.CRLF, dot-unstuffed, in memory up to `KEPT` octets and in a
    spool file past them, which the caller closes; the rest stays in `reader` for the next
    command (clients may pipeline QUIT behind the data). The file is made in `spool_dir`
    (the system's temp directory when None) without a name, so nothing is left there
    however the session ends, a killed process included."""
    spool = _Spool(line_limit, spool_dir)
    try:
        return await _spool(reader, size_limit, spool)
    except BaseException:
        spool.close()
        raise


async def _spool(reader: asyncio.StreamReader, size_limit: int | None, spool: _Spool) -> Spooled:
    """The end is searched for by its dot: `readuntil(b".")` finds one with memchr (0.2 ms
    per 10 MB; base64 holds none), and only a dot after CRLF has its next two octets read
    to see whether it ends the data. Searching for ".\r\n" steps a few octets at a time
    (7 ms per 10 MB); it is what finds the end in text, where dots come every few words:
    after a dot found soon, the rest of the window is searched so.

    Pieces are gathered and fed to the spool a window at a time: text whose lines end in a
    full stop comes a line per piece, and feeding each on its own cost 870 ms per 10 MB."""
    tail = b"\r\n"  # the DATA command's line end stands before the first line
    received = 0
    too_big = False
    clear = 0  # octets at the buffer's start known to hold no end, not yet taken
    by_dot_from = 0  # `received` from which the end is searched for by its dot again
    gathered: list[bytes] = []
    gathered_size = 0
    saved_limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = WINDOW  # type: ignore[attr-defined]
    try:
        while tail != b"\r\n.\r\n":
            if clear:
                piece = await reader.readexactly(min(clear, WINDOW))
                clear -= len(piece)
            elif received >= by_dot_from:
                try:
                    piece = await reader.readuntil(_DOT)
                except asyncio.LimitOverrunError as exc:
                    clear = exc.consumed  # the buffer (twice the limit or more) has no dot
                    continue
                if (tail + piece[-3:])[-3:] == b"\r\n.":
                    piece += await reader.readexactly(2)  # CRLF here ends the data
                if len(piece) < _DOTS_APART:
                    by_dot_from = received + len(piece) + WINDOW
            else:
                try:
                    piece = await reader.readuntil(_END)
                except asyncio.LimitOverrunError as exc:
                    # taken a window at a time, and searched once
                    clear = exc.consumed
                    continue
            received += len(piece)
            tail = (tail + piece[-5:])[-5:]
            if size_limit is not None and received - len(_END) > size_limit:
                too_big = True
            if too_big or spool.line_too_long:
                gathered, gathered_size = [], 0
                continue  # read to the end, so that the session stays in step
            gathered.append(piece)
            gathered_size += len(piece)
            if gathered_size >= WINDOW and tail != b"\r\n.\r\n":
                # the end's ".\r\n" is the last piece's, so all of this is content
                await spool.feed(b"".join(gathered), gathered_size)
                gathered, gathered_size = [], 0
        if gathered and not too_big:
            block = b"".join(gathered)
            await spool.feed(block, len(block) - len(_END))
    finally:
        reader._limit = saved_limit  # type: ignore[attr-defined]
    return Spooled(spool, too_big)


async def read_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    line_limit: int,
    spool_dir: Path | None = None,
) -> DataResult:
    """`spool_data`, read back into memory at once."""
    spooled = await spool_data(reader, size_limit, line_limit, spool_dir)
    try:
        if spooled.too_big:
            return DataResult(b"", too_big=True)
        if spooled.line_too_long:
            return DataResult(b"", line_too_long=True)
        return DataResult(await spooled.read())
    finally:
        spooled.close()


def _nameless_file(directory: Path | None) -> IO[bytes]:
    """A file with no name, gone with its last descriptor however the process ends. Made
    with O_TMPFILE and without O_EXCL (which Python's TemporaryFile sets), so the blob store
    may still give it a name; a file system without O_TMPFILE gets a temp file unlinked at
    once, which the store copies instead."""
    where = str(directory) if directory is not None else tempfile.gettempdir()
    try:
        fd = os.open(where, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):
        return tempfile.TemporaryFile(dir=directory)
    return os.fdopen(fd, "w+b")


def _write_out(file: IO[bytes], digest: hashlib._Hash, pieces: list[bytes | memoryview]) -> None:
    for piece in pieces:
        digest.update(piece)
    file.writelines(pieces)


def _read_back(file: IO[bytes]) -> bytes:
    file.flush()
    file.seek(0)
    return file.read()
