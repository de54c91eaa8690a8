"""SMTP DATA read in large pieces instead of one await per line, spooled to a file.

aiosmtpd keeps every line of DATA as its own object and joins them at the end: for a 10 MB
message that is ~4x its size in memory and most of a minimal relay's CPU (DESIGN.md,
measured facts). Here the stream is searched for the end of data in windows of
`WINDOW` octets at C speed; each window's complete lines are checked for length,
dot-unstuffed (`gateway.mail.lines`) and written to a nameless spool file at once. So a
session holds a window or two while its client sends, not the message: with 20 big
messages arriving at once that was 20 whole messages in memory (issue 18). The message is
read back in one piece only once the end of data has arrived.

The end is only ever CRLF "." CRLF: a bare LF or CR before the dot does not end the data
(no SMTP smuggling), and the pipeline refuses such mail anyway.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.mail import lines

WINDOW = 256 * 1024
_END = b".\r\n"


@dataclass(frozen=True)
class DataResult:
    content: bytes
    too_big: bool = False
    line_too_long: bool = False


class _Spool:
    """Complete lines, checked and unstuffed, go to the file; a line's start waits for its
    end in `carry` (at most the line limit: a longer one is refused at once)."""

    def __init__(self, file: IO[bytes], line_limit: int) -> None:
        self.file = file
        self.line_limit = line_limit
        self.carry = bytearray()
        self.line_too_long = False

    async def feed(self, piece: bytes, end: int) -> None:
        """`piece[:end]`, which continues what came before."""
        if self.line_too_long or end == 0:
            return
        last = piece.rfind(b"\n", 0, end)
        if last == -1:
            self.carry += memoryview(piece)[:end]
            self.line_too_long = len(self.carry) > self.line_limit
            return
        if self.carry:
            self.carry += memoryview(piece)[: last + 1]
            block: bytes | bytearray = self.carry
        else:
            block = piece[: last + 1] if last + 1 < len(piece) else piece
        self.carry = bytearray(memoryview(piece)[last + 1 : end])
        if lines.has_line_longer_than(block, self.line_limit) or (
            len(self.carry) > self.line_limit
        ):
            self.line_too_long = True
            return
        await asyncio.to_thread(self.file.writelines, _unstuffed_pieces(block))


def _unstuffed_pieces(block: bytes | bytearray) -> list[bytes | memoryview]:
    """`block` (whole lines) without the stuffing dots, as slices of it where they are few."""
    dots = lines.stuffing_dots(block)
    if dots is None:
        return [lines.unstuffed(block)]
    positions = [0, *dots] if block.startswith(b".") else dots
    view = memoryview(block)
    pieces: list[bytes | memoryview] = []
    start = 0
    for position in positions:
        pieces.append(view[start:position])
        start = position + 1
    pieces.append(view[start:])
    return pieces


class Spooled:
    """DATA as received, in its spool file until `read` takes it into memory; `close`
    ends the file (it has no name, so nothing is left behind)."""

    def __init__(self, file: IO[bytes], too_big: bool = False, line_too_long: bool = False):
        self._file = file
        self.too_big = too_big
        self.line_too_long = line_too_long
        self.size = 0 if too_big or line_too_long else file.tell()

    async def read(self) -> bytes:
        return await asyncio.to_thread(_read_back, self._file)

    def close(self) -> None:
        self._file.close()


async def spool_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    line_limit: int,
    spool_dir: Path | None = None,
) -> Spooled:
    """Everything up to CRLF.CRLF, dot-unstuffed, into a spool file the caller closes; the
    rest stays in `reader` for the next command (clients may pipeline QUIT behind the data).
    The file is made in `spool_dir` (the system's temp directory when None) without a name,
    so nothing is left there however the session ends, a killed process included."""
    file = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - Spooled.close ends it
    try:
        return await _spool(reader, size_limit, line_limit, file)
    except BaseException:
        file.close()
        raise


async def _spool(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int, file: IO[bytes]
) -> Spooled:
    spool = _Spool(file, line_limit)
    tail = b"\r\n"  # the DATA command's line end stands before the first line
    received = 0
    too_big = False
    held = False  # a piece ended in ".\r\n", which ends the data if the line began there
    saved_limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = WINDOW  # type: ignore[attr-defined]
    try:
        while tail != b"\r\n.\r\n":
            try:
                piece = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as exc:
                piece = await reader.readexactly(exc.consumed)
            received += len(piece)
            tail = (tail + piece[-5:])[-5:]
            if size_limit is not None and received - len(_END) > size_limit:
                too_big = True
            if too_big or spool.line_too_long:
                continue  # read to the end, so that the session stays in step
            if held:
                await spool.feed(_END, len(_END))
            held = piece.endswith(_END)
            await spool.feed(piece, len(piece) - len(_END) if held else len(piece))
    finally:
        reader._limit = saved_limit  # type: ignore[attr-defined]
    return Spooled(file, too_big, spool.line_too_long)


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


def _read_back(file: IO[bytes]) -> bytes:
    file.flush()
    file.seek(0)
    return file.read()
