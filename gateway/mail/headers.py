"""Read and add header fields on raw message bytes.

The agent's header bytes are never re-serialized: Python's email generator can refold or
inject fields (CVE-2024-6923 class). We only split the raw bytes, read values, and splice
new, generated fields in front.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

from gateway.mail import lines

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:", re.MULTILINE)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# A message's header block is parsed by intake's checks, the copies' base, the MIME parse and
# again by delivery: the fields of recent small blocks are kept (immutable) to be given again.
CACHED_BLOCKS = 512
CACHED_BLOCK_BYTES = 4096  # larger blocks are parsed anew: rare, and costly to keep
_CACHED_ADDRESS_LISTS = 512
MAX_LINE = 78


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One field exactly as it stands in the message, folding and line end included."""

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value, undecoded, leading white space removed.

        Raw 8-bit that is not UTF-8 is what older clients and scanners wrote in their own
        code page: read as Windows-1252 (Latin-1's superset), a Subject "Grüße" is shown so
        on the console and the prospect's page, not as "Gr??e"."""
        _, _, value = self.raw.partition(b":")
        if value.find(b"\n", 0, len(value) - 1) != -1:  # folded: a line end before the last
            value = _FOLD.sub(b"", value)
        return utf8_or_windows_1252(value.rstrip(b"\r\n")).strip()


def utf8_or_windows_1252(data: bytes) -> str:
    """8-bit text whose charset is not declared, for display: UTF-8 when it is valid UTF-8,
    else the Windows code page that mail programs wrote before it (Latin-1 plus € and „“)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def split_offsets(raw: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Where the header block ends (after its last line end) and where the body starts
    (after the blank line): offsets, so that a 10 MB body is never copied to find them.

    With `start` and `end`, of the part of `raw` between them (a MIME part's), as offsets
    into `raw`; without a blank line both are `end`: it is all header."""
    stop = len(raw) if end is None else end
    if raw.startswith(b"\r\n", start, stop):
        return start, start + 2
    if raw.startswith(b"\n", start, stop):
        return start, start + 1
    match = _BLANK_LINE.search(raw, start, stop)
    if match is None:
        return stop, stop
    first_eol = 2 if raw[match.start()] == 0x0D else 1
    return match.start() + first_eol, match.end()


def split_offsets_at_start(start: bytes) -> tuple[int, int] | None:
    """split_offsets() of a message known by its first bytes `start` alone; None when they
    do not settle it (no blank line among them, or one too near their end to be sure of)."""
    if start.startswith((b"\r\n", b"\n")):
        return split_offsets(start)
    match = _BLANK_LINE.search(start)
    if match is None or match.start() + 4 > len(start):
        return None
    return split_offsets(start)


def header_block(raw: bytes) -> bytes:
    """The header block with its last line end, without the body."""
    return raw[: split_offsets(raw)[0]]


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """Header block (with its last line end) and body (after the blank line), both copied:
    for big mail, `split_offsets` or `header_block`."""
    header_end, body_start = split_offsets(raw)
    return raw[:header_end], raw[body_start:]


def parse_fields(header_block: bytes) -> list[HeaderField]:
    """The fields of a header block, in order; a leading non-field line is kept as its own."""
    if len(header_block) <= CACHED_BLOCK_BYTES:
        return list(_parsed(header_block))
    return _parse_fields(header_block)


@functools.lru_cache(maxsize=CACHED_BLOCKS)
def _parsed(header_block: bytes) -> tuple[HeaderField, ...]:
    return tuple(_parse_fields(header_block))


def _parse_fields(header_block: bytes) -> list[HeaderField]:
    starts = [m.start() for m in _FIELD_START.finditer(header_block)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    fields = []
    for begin, end in zip(starts, [*starts[1:], len(header_block)], strict=True):
        chunk = header_block[begin:end]
        name = chunk.split(b":", 1)[0].strip().decode("ascii", errors="replace").lower()
        fields.append(HeaderField(name, chunk))
    return fields


def fields_of(raw: bytes) -> list[HeaderField]:
    return parse_fields(header_block(raw))


def values(fields: Iterable[HeaderField], name: str) -> list[str]:
    wanted = name.lower()
    return [f.value for f in fields if f.name == wanted]


def first_value(fields: Iterable[HeaderField], name: str) -> str | None:
    found = values(fields, name)
    return found[0] if found else None


# The header class that email.policy.default's `header_factory("x", value)` would build anew
# on every call (type() in HeaderRegistry.__getitem__, the larger part of its cost), made once.
_UNSTRUCTURED = HeaderRegistry()["x"]


def controls_blanked(text: str) -> str:
    """Control characters (CR and LF among them) as spaces: a name or value from the mail that
    is shown, logged or written into a header can never start a new line there."""
    return _CONTROL.sub(" ", text)


def has_control(text: str) -> bool:
    """Whether controls_blanked would change `text`."""
    return _CONTROL.search(text) is not None


def decoded(value: str) -> str:
    """An RFC 2047 encoded value as one line of text, for display, logs and the journal.

    Control characters (an encoded CR LF among them) become spaces, so the result can never
    start a new line wherever it is shown.
    """
    if value.isascii() and "=?" not in value:
        return controls_blanked(value)  # no encoded word: the parser would give it back as is
    try:
        text = str(_UNSTRUCTURED("x", value))
    except (ValueError, LookupError, IndexError):
        text = value
    return controls_blanked(text)


def addresses(fields: Iterable[HeaderField], name: str) -> list[str]:
    """The bare addresses of an address-list field (From, To, Cc ...), lower-cased."""
    pairs = _address_pairs(tuple(values(fields, name)))
    return [addr.lower() for _, addr in pairs if addr]


@functools.lru_cache(maxsize=_CACHED_ADDRESS_LISTS)
def _address_pairs(field_values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """getaddresses() of these values, kept: a message's From is read by the intake's checks,
    for the sender's name and again by each copy's signer, and an agent's From recurs."""
    return tuple(getaddresses(field_values))


def display_name(fields: Iterable[HeaderField], names: tuple[str, ...], address: str) -> str:
    """The name `address` goes by in the `names` fields ("from", or "to" and "cc"), decoded;
    "" when it has none."""
    pairs = _address_pairs(tuple(v for name in names for v in values(fields, name)))
    wanted = address.lower()
    return next((decoded(d).strip() for d, a in pairs if a.lower() == wanted), "")


def sender_name(fields: Iterable[HeaderField], sender: str) -> str:
    """The display name the From gives the envelope sender (or its only address), at most
    200 characters; "" when it gives none. Prospects' pages name the agent so. Mail with
    the null sender has no address of the agent's beside the name: its only author's
    address stands in for a name it lacks."""
    fields = list(fields)
    authors = _address_pairs(tuple(values(fields, "from")))
    if len(authors) == 1 and authors[0][1].lower() != sender.lower():
        name = decoded(authors[0][0]).strip()  # a team's address, the agent's envelope
        return (name or ("" if sender else authors[0][1]))[:200]
    return display_name(fields, ("from",), sender)[:200]


def format_field(name: str, value: str) -> bytes:
    """A generated field, folded at white space, CRLF-terminated.

    Values come from our own code; a CR or LF in one would let it inject a field, so it is
    refused outright rather than cleaned.
    """
    if "\r" in value or "\n" in value or ":" in name or not name.isascii():
        raise ValueError(f"refusing to write header {name!r}: line break or bad name")
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        candidate = f"{current} {word}"
        if len(candidate) > MAX_LINE and current.strip() and not current.endswith(":"):
            lines.append(current)
            current = f" {word}"
        else:
            current = candidate
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def remove_fields(raw: bytes, names: Iterable[str]) -> bytes:
    """`raw` without the top-level fields of these names; every other byte stays."""
    unwanted = {name.lower() for name in names}
    block = header_block(raw)
    fields = parse_fields(block)
    if not any(field.name in unwanted for field in fields):
        return raw
    kept = [field.raw for field in fields if field.name not in unwanted]
    return b"".join([*kept, memoryview(raw)[len(block) :]])


def prepend(raw: bytes, fields: Iterable[bytes]) -> bytes:
    """New fields in front of the message, as trace and signature fields are added."""
    return b"".join(fields) + raw


def has_bare_line_end(data: bytes) -> bool:
    """A CR not followed by LF or an LF not preceded by CR: the stuff of SMTP smuggling."""
    return lines.bare_line_end(data) != -1
