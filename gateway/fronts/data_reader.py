"""SMTP DATA read in large pieces instead of one await per line, spooled to a file.

aiosmtpd keeps every line of DATA as its own object and joins them at the end: for a 10 MB
message that is ~4x its size in memory and most of a minimal relay's CPU (DESIGN.md,
measured facts). Here each piece the connection delivers is searched for the end of data
at C speed (`DataFeed`); the pieces are gathered into windows of `WINDOW` octets, and each
window's complete lines are checked for length, searched for a bare CR or LF and dot-unstuffed
(`gateway.mail.lines`) while they are still in the CPU's cache: the pipeline's own pass for
bare line ends, over 10 MB read back cold, took about 21 ms of the relay's CPU, the same
search here about 15 ms (py-spy, bench/relay.py). The first `KEPT` octets stay in memory
(small mail costs no file); past them everything goes to a nameless spool file, hashed
(sha256) as it is written, so that the blob store can take the file as the message's
original instead of a second copy of its bytes (`Spooled.hashed_file`). So a session holds
a window or two while its client sends (the protocol stops reading while more waits for
the spool), not the message: with 20 big messages arriving at once that
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
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gateway.mail import lines
from gateway.store.blobs import HashedFile

WINDOW = 256 * 1024
KEPT = 256 * 1024  # octets kept in memory before a spool file is made
_END = b".\r\n"
_DOT = b"."
_END_OF_DATA = b"\r\n.\r\n"


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

    def __init__(self, spool: _Spool, too_big: bool = False, failed: OSError | None = None) -> None:
        self._spool = spool
        self.too_big = too_big
        self.failed = None if too_big else failed  # why the spool could not be written
        self.line_too_long = spool.line_too_long and not too_big and failed is None
        self.size = 0 if too_big or failed or spool.line_too_long else spool.size
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


class DataFeed:
    """DATA as the connection delivers it, fed piece by piece from `data_received`.

    `feed` runs in the protocol's callback and only finds the end (CRLF "." CRLF, also
    across pieces) and gathers windows; `spooled` checks and writes them in the session's
    task, since the spool file is written off the loop. The bytes behind the end are the
    next commands (clients pipeline QUIT behind the data), and `feed` says where they begin.
    `pending` tells the protocol when to stop reading: the spool is behind its client.
    """

    def __init__(self, size_limit: int | None, line_limit: int, spool_dir: Path | None) -> None:
        self._spool = _Spool(line_limit, spool_dir)
        self._size_limit = size_limit
        self._tail = b"\r\n"  # the DATA command's line end stands before the first line
        self.received = 0
        self.too_big = False
        self.ended = False
        self._gathered: list[bytes] = []
        self._gathered_size = 0
        self._windows: list[tuple[bytes, int]] = []
        self._wake: asyncio.Future[None] | None = None
        self.drained: Callable[[], None] | None = None  # called as the spool catches up
        self.failed: OSError | None = None  # the spool could not be written: read on to the end

    def feed(self, data: bytes) -> int | None:
        """Takes `data`; the index in it just past the end of data, or None before that."""
        end = _end_in(self._tail, data)
        piece = data if end is None else data[:end]
        self.received += len(piece)
        self._tail = (self._tail + piece[-4:])[-4:]
        if self._size_limit is not None and self.received - len(_END) > self._size_limit:
            self.too_big = True
        if self.too_big or self.failed is not None or self._spool.line_too_long:
            self._gathered, self._gathered_size, self._windows = [], 0, []
        else:
            self._gathered.append(piece)
            self._gathered_size += len(piece)
            if end is None and self._gathered_size >= WINDOW:
                # the last octets wait: they may be the start of the end
                block = b"".join(self._gathered)
                self._windows.append((block, len(block) - 4))
                self._gathered, self._gathered_size = [block[-4:]], 4
        if end is not None:
            self.ended = True
            if self._gathered:
                block = b"".join(self._gathered)
                self._windows.append((block, len(block) - len(_END)))
                self._gathered, self._gathered_size = [], 0
        if self._wake is not None and not self._wake.done() and (self._windows or self.ended):
            self._wake.set_result(None)
        return end

    @property
    def pending(self) -> int:
        """Octets received and not yet spooled."""
        return self._gathered_size + sum(len(block) for block, _ in self._windows)

    async def spooled(self) -> Spooled:
        """The whole DATA once its end has come, checked and spooled; the caller closes it.

        A spool that cannot be written (a full disk) is given up, not the data: the rest is
        read to its end, so that the client hears its answer then, in step."""
        spool = self._spool
        try:
            while True:
                while self._windows:
                    block, end = self._windows.pop(0)
                    try:
                        await spool.feed(block, end)
                    except OSError as exc:
                        self.failed = exc
                        self._windows = []
                    if self.drained is not None:
                        self.drained()
                if self.ended:
                    break
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
                self._wake = None
        except BaseException:
            spool.close()
            raise
        return Spooled(spool, self.too_big, self.failed)


def _end_in(tail: bytes, data: bytes) -> int | None:
    """Where in `data` the end of data stops, when it does; `tail` are the octets before.

    A piece without a dot holds no end: memchr finds that out at 0.2 ms per 10 MB, where a
    search for the whole end steps a few octets at a time (5-7 ms per 10 MB; base64, most
    of a big message, has no dots). Only from the first dot on is the end searched for."""
    joined = tail + data[:4]
    found = joined.find(_END_OF_DATA)
    if found != -1:
        return found + 5 - len(tail)
    dot = data.find(_DOT)
    if dot == -1:
        return None
    found = data.find(_END_OF_DATA, max(dot - 2, 0))
    return None if found == -1 else found + 5


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
