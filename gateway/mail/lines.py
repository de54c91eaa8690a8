"""Line scans over whole messages at C speed: no Python loop per line.

A 10 MB attachment is 134,000 lines of base64; a loop that visits each costs tens of
milliseconds of the event loop's time per message (issue 18 measured 98 ms of such scans
per 10 MiB). Each scan here is made of `bytes.find`/`rfind`, `translate` and regular
expressions whose first character is a literal, over windows of the data (kept in the CPU
cache, and never a copy of the whole message), with Python stepping once per window.

All take `bytes` or `bytearray`; offsets are into the data as given.
"""

from __future__ import annotations

import re

WINDOW = 1024 * 1024
MANY_DOTS = 256
_MISSES_IN_TEXT = 8  # find_by's octet that often in a row without the rest: text
_TEXT_WINDOW = 64 * 1024
_BARE_CR = re.compile(rb"\r(?:[^\n]|\Z)")
_BARE_ANY = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_NOT_LINE_END = bytes(b for b in range(256) if b not in b"\r\n")

Data = bytes | bytearray


def bare_line_end(data: Data, window: int = WINDOW, start: int = 0, end: int | None = None) -> int:
    """The offset of the first CR not followed by LF or LF not preceded by CR; -1 if none.

    Such line ends are the stuff of SMTP smuggling. Per window: a regex finds a bare CR
    (it starts at a literal, so it runs at memchr speed), and with none there every CR
    stands before an LF, so the window's CR and LF counts differ exactly when an LF is
    bare; they are counted in the window's CR/LF bytes alone, as `translate` leaves them.
    Lines of one width (base64) are checked by strided slices instead of that search,
    which stops at every CR (`_even_lines`; 8.8 → 4.8 ms per 10 MB of base64, idle).
    Windows never end between a CR and its LF. Only a window that fails is searched with
    the slow lookaround pattern, to say where. `start` and `end` bound the scan without a
    copy (a CR at `end` counts as bare).
    """
    size = len(data) if end is None else end
    while start < size:
        end = min(start + window, size)
        if end < size and data[end - 1] == 0x0D:  # keep a CRLF in one window
            end += 1
        line_ends = data[start:end].translate(None, _NOT_LINE_END)
        paired = 2 * line_ends.count(b"\r") == len(line_ends)
        if not paired or (
            not _even_lines(data, start, end, len(line_ends))
            and _BARE_CR.search(data, start, end) is not None
        ):
            found = _BARE_ANY.search(data, start, end)
            assert found is not None
            return found.start()
        start = end
    return -1


def _even_lines(data: Data, start: int, end: int, line_ends: int) -> bool:
    """Whether all `line_ends` CR and LF octets of `data[start:end]` pair up as CRLF
    ending lines of one width, as in base64: then two strided slices check them, where
    the bare-CR search would stop at every one. The window may begin and end inside a
    line (its first CRLF is checked on its own; after the last, no line end may come)."""
    first = data.find(b"\n", start, end)
    last = data.rfind(b"\n", start, end)
    width = data.find(b"\n", first + 1, end) - first
    if first <= start or data[first - 1] != 0x0D or width < 2:
        return False
    count = (last - first) // width
    if count * width != last - first or 2 + 2 * count != line_ends:
        return False
    crs = data[first + width - 1 : last : width]
    lfs = data[first + width : last + 1 : width]
    return crs.count(b"\r") == count and lfs.count(b"\n") == count


def has_line_longer_than(data: Data, limit: int, start: int = 0, end: int | None = None) -> bool:
    """Whether a line is longer than `limit` octets, its LF included (RFC 5321 counts the
    CRLF); the last line needs no line end. Lines end at LF, as aiosmtpd counts them.

    From each line start, the next `limit` octets must hold an LF; the scan goes on after
    the last LF among them, so it steps about `limit` octets at a time, not a line.
    """
    size = len(data) if end is None else end
    while size - start > limit:
        found = data.rfind(b"\n", start, start + limit)
        if found == -1:
            return True
        start = found + 1
    return False


def dot_line(data: Data, start: int = 0, end: int | None = None) -> int:
    """`data.find(b"\\r\\n.", start, end)`, about 40 times as fast where dots are rare
    (`find_by` its dot)."""
    return find_by(data, b"\r\n.", 2, start, end)


def find_by(data: Data, needle: bytes, rare: int, start: int = 0, end: int | None = None) -> int:
    """`data.find(needle, start, end)`, found by its octet `needle[rare]` first.

    A search for several octets steps a few at a time (7 ms per 10 MB for three); a single
    octet is found with memchr (0.2 ms), and one that base64 never holds (a dot, a hyphen)
    is not found in it at all. So that octet is found first and the rest of the needle
    looked at around it. Where it comes often without the rest (a dot in prose), a window
    is searched for the whole needle instead, then the octet again.
    """
    end = len(data) if end is None else end
    octet, after = needle[rare : rare + 1], len(needle) - 1 - rare
    at = start + rare  # where the octet is looked for
    misses = 0
    while at < end - after:
        if misses == _MISSES_IN_TEXT:
            stop = min(at - rare + _TEXT_WINDOW, end)
            found = data.find(needle, at - rare, stop)
            if found != -1:
                return found
            at, misses = max(at, stop - after), 0
            continue
        at = data.find(octet, at, end - after)
        if at == -1:
            return -1
        if data.startswith(needle, at - rare, end):
            return at - rare
        at += 1
        misses += 1
    return -1


def stuffing_dots(
    data: Data, start: int = 0, most: int = MANY_DOTS, end: int | None = None
) -> list[int] | None:
    """Where a dot follows a CRLF, the first CRLF at `start` or later, before `end`; None
    when there are more than `most` (then replacing them all at C speed beats listing
    them). A dot at `start` is the caller's to see."""
    dots: list[int] = []
    found = dot_line(data, start, end)
    while found != -1:
        if len(dots) == most:
            return None
        dots.append(found + 2)
        found = dot_line(data, found + 3, end)
    return dots


def has_dot_line(data: Data, start: int = 0) -> bool:
    """Whether a line (from `start`, itself a line start) begins with ".": such lines are
    dot-stuffed on the wire (RFC 5321 4.5.2)."""
    return data.startswith(b".", start) or dot_line(data, start) != -1


def stuffed(data: bytes) -> bytes:
    """`data` with the dot doubled at each line start after its first (RFC 5321 4.5.2);
    `data` itself, not a copy, when it has none."""
    return data if dot_line(data) == -1 else data.replace(b"\r\n.", b"\r\n..")


def without(data: Data, positions: list[int]) -> bytes:
    """`data` minus the octets at these ascending positions, in one copy."""
    if not positions:
        return bytes(data)
    view = memoryview(data)
    pieces, start = [], 0
    for position in positions:
        pieces.append(view[start:position])
        start = position + 1
    pieces.append(view[start:])
    return b"".join(pieces)


def unstuffed(data: Data) -> bytes:
    """DATA as received, minus the dot that stuffing put before each line starting with
    one: a single copy, built from slices of `data`, when the dots are few."""
    dots = stuffing_dots(data)
    if dots is None:
        first = 1 if data.startswith(b".") else 0
        return bytes(memoryview(data)[first:]).replace(b"\r\n.", b"\r\n")
    return without(data, [0, *dots] if data.startswith(b".") else dots)


class LineEndScan:
    """bare_line_end() over data that comes in pieces cut anywhere, each scanned as it
    comes: a stored copy is checked as it is read, never held whole."""

    def __init__(self) -> None:
        self.found = -1  # the offset of the first bare CR or LF, once seen
        self._seen = 0
        self._cr = False  # the last piece ended with a CR, its LF not seen yet

    def update(self, data: Data) -> None:
        if self.found != -1 or not data:
            return
        start = 0
        if self._cr:
            if data[0] != 0x0A:
                self.found = self._seen - 1
                return
            start = 1
        self._cr = data[-1] == 0x0D
        offset = bare_line_end(data, start=start, end=len(data) - self._cr)
        if offset != -1:
            self.found = self._seen + offset
        self._seen += len(data)

    def end(self) -> int:
        """The offset of the first bare CR or LF in all the data; -1 when there is none."""
        if self.found == -1 and self._cr:
            self.found = self._seen - 1
        return self.found
