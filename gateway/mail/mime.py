"""MIME structure of a raw message as byte offsets, and byte surgery on it.

Large attachments become personal download links, so the gateway must drop parts and add a
short link block to the bodies while every other byte the agent wrote stays as it was:
Python's email generator can refold or inject header fields (CVE-2024-6923 class), so nothing
here re-serializes a message. `parse` finds part boundaries with `bytes.find` and reads each
part's header block with `gateway.mail.headers`; the surgery functions build the output from
slices of the original plus a few generated, CRLF-terminated pieces, in one `b"".join`.

Offsets in a `MimePart` are only valid for the exact bytes they were parsed from. To apply
several edits in sequence, parse again in between (parsing is cheap)::

    root = parse(raw)
    raw = remove_parts(raw, root, linked_ids)
    raw = add_link_block(raw, parse(raw), text_block, html_block)

Decisions, in brief (details on the functions):

- Boundaries follow RFC 2046: the line break before a delimiter line belongs to the
  delimiter, so a part's range excludes it; a missing close delimiter ends the last part at
  the parent's end; message/rfc822 parts are leaves.
- Content-Type and Content-Disposition parameters are read by a small linear parser here
  (RFC 2231 continuations and charsets, RFC 2047 in file names): the standard library's
  header parser recurses on nested comments and is quadratic on some inputs, so a crafted
  header would turn into a RecursionError or a long stall instead of a clean 554.
- Removing every part of a multipart leaves it one empty ``text/plain; charset=utf-8`` part;
  removing the root of a single-part message empties it into such a text part too.
- The link block never changes the agent's text: see `add_link_block` for the charset and
  transfer-encoding rules, and for what happens when there is no body to put it in.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import mimetypes
import re
import secrets
import unicodedata
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote_to_bytes

from gateway.mail import headers, lines
from gateway.mail.headers import HeaderField
from rules.facts import PartFacts

CRLF = b"\r\n"
_LINE_BREAK = re.compile(rb"\r\n|\n")
_TEXT_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HTML_BODY_END = re.compile(rb"</body\s*>", re.IGNORECASE)
_ASCII_LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1))
_CP1252_LETTERS = bytes(
    b for b in range(0x80, 0x100) if bytes([b]).decode("cp1252", "ignore").isalpha()
)
_COMMENT_SYNTAX = re.compile(r'\\.|[()"]', re.DOTALL)
_MIME_ATOM = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_TYPE = re.compile(rf"\s*({_MIME_ATOM})\s*/\s*({_MIME_ATOM})")
_DISPOSITION = re.compile(rf"\s*({_MIME_ATOM})")
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_SECTION = re.compile(r"([^*]+)\*(?:(\d{1,3})(\*?))?")
_CHARSET_PARAM = re.compile(rb'(;\s*charset\s*=\s*)("[^"\r\n]*"|[^\s;()"]+)', re.IGNORECASE)
_CHARSET_WORD = re.compile(rb"charset", re.IGNORECASE)

_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_KNOWN_ENCODINGS = _IDENTITY_ENCODINGS | {"quoted-printable", "base64"}
_SIGNED_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
_BODY_TYPES = ("text/plain", "text/html")
_MAX_PARAM_CHARS = 64 * 1024
_MAX_LINE = 998
_SIZE_WINDOW = 1024 * 1024
_NOT_SPACE = bytes(b for b in range(256) if b not in b"\r\n \t")
_TRANSLITERATION = str.maketrans(
    {"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss", "€": "EUR"}
    | dict.fromkeys("‐‑‒–—―−", "-")
    | dict.fromkeys("„“”«»", '"')
    | dict.fromkeys("‚‘’‹›", "'")
    | {"…": "...", "\u00a0": " ", "\u202f": " "}
)
_EMPTY_TEXT_PART = b"Content-Type: text/plain; charset=utf-8" + CRLF

_Edit = tuple[int, int, bytes]


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile message from costing more than a normal one."""

    max_depth: int = 20
    max_parts: int = 500
    max_header_bytes: int = 256 * 1024


class UnsafeMessage(Exception):
    """A message we will not take apart; `str()` is a sentence for a 554 5.6.0 reply."""


@dataclass(frozen=True)
class MimePart:
    """One part, located by byte offsets into the raw message it was parsed from.

    `id` is "" for the root and "1", "2.1", ... below it: the n-th child of part P is
    "P.n". `content_id` is the Content-ID value as written, angle brackets included.
    """

    id: str
    start: int
    end: int
    body_start: int
    content_type: str
    params: Mapping[str, str] = field(hash=False)
    disposition: str | None
    filename: str | None
    transfer_encoding: str
    content_id: str | None
    children: tuple[MimePart, ...]

    def walk(self) -> Iterator[MimePart]:
        """This part and all below it, depth first in document order (without recursion)."""
        stack: list[MimePart] = [self]
        while stack:
            part = stack.pop()
            yield part
            stack.extend(reversed(part.children))

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")


# --- parsing -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Draft:
    id: str
    start: int
    end: int
    body_start: int
    reading: _Reading
    children: list[int] = field(default_factory=list)


def parse(raw: bytes, limits: Limits = Limits()) -> MimePart:
    """The part tree of `raw`, or UnsafeMessage when it breaks a limit or its structure.

    Iterative, so a message nested ten thousand levels deep fails at `max_depth` instead of
    exhausting the stack; the part budget is checked as each delimiter is found.
    """
    drafts = [_read_part(raw, "", 0, len(raw), "", limits)]
    pending = [0]
    while pending:
        index = pending.pop()
        draft = drafts[index]
        if not draft.reading.content_type.startswith("multipart/"):
            continue
        depth = draft.id.count(".") + 2 if draft.id else 1
        if depth > limits.max_depth:
            raise UnsafeMessage(
                f"The message nests MIME parts deeper than {limits.max_depth} levels."
            )
        prefix = f"{draft.id}." if draft.id else ""
        ranges = _child_ranges(raw, draft.body_start, draft.end, _boundary(draft.reading.params))
        for number, (start, end) in enumerate(ranges, 1):
            if len(drafts) >= limits.max_parts:
                raise UnsafeMessage(f"The message has more than {limits.max_parts} MIME parts.")
            child = _read_part(
                raw, f"{prefix}{number}", start, end, draft.reading.content_type, limits
            )
            draft.children.append(len(drafts))
            pending.append(len(drafts))
            drafts.append(child)
    built: dict[int, MimePart] = {}
    for index in range(len(drafts) - 1, -1, -1):
        d = drafts[index]
        r = d.reading
        built[index] = MimePart(
            id=d.id,
            start=d.start,
            end=d.end,
            body_start=d.body_start,
            content_type=r.content_type,
            params=r.params,
            disposition=r.disposition,
            filename=r.filename,
            transfer_encoding=r.transfer_encoding,
            content_id=r.content_id,
            children=tuple(built.pop(child) for child in d.children),
        )
    return built[0]


def _read_part(
    raw: bytes, part_id: str, start: int, end: int, parent: str, limits: Limits
) -> _Draft:
    block, body_start = _header_bounds(raw, start, end, limits)
    default = "message/rfc822" if parent == "multipart/digest" else "text/plain"
    if len(block) <= headers.CACHED_BLOCK_BYTES:
        reading = _cached_reading(block, default)
    else:
        reading = _reading(block, default)
    return _Draft(part_id, start, end, body_start, reading)


@dataclass(frozen=True, slots=True)
class _Reading:
    """What a part's header block says of the part."""

    content_type: str
    params: Mapping[str, str]
    disposition: str | None
    filename: str | None
    transfer_encoding: str
    content_id: str | None


_PART_FIELDS = frozenset(
    ("content-type", "content-disposition", "content-transfer-encoding", "content-id")
)


def _reading(block: bytes, default: str) -> _Reading:
    values: dict[str, str] = {}
    for found in headers.parse_fields(block):
        if found.name in _PART_FIELDS and found.name not in values:
            values[found.name] = found.value
    type_value = values.get("content-type")
    content_type, params = _content_type(type_value) if type_value is not None else (default, {})
    disposition_value = values.get("content-disposition")
    disposition, disposition_params = (
        _disposition(disposition_value) if disposition_value is not None else (None, {})
    )
    encoding = (values.get("content-transfer-encoding") or "7bit").strip()
    return _Reading(
        content_type=content_type,
        params=MappingProxyType(params),
        disposition=disposition,
        filename=_filename(disposition_params.get("filename") or params.get("name")),
        transfer_encoding=encoding.lower() or "7bit",
        content_id=(values.get("content-id") or "").strip() or None,
    )


@functools.lru_cache(maxsize=headers.CACHED_BLOCKS)
def _cached_reading(block: bytes, default: str) -> _Reading:
    """_reading(), kept: the parts inside a message have the header blocks of the program
    that wrote it (the same text part, the same kind of attachment), message after message."""
    return _reading(block, default)


def _header_bounds(raw: bytes, start: int, end: int, limits: Limits) -> tuple[bytes, int]:
    """The header block of the part at `start` and the offset of its first body byte.

    Only the block is copied, never the body, and the search for its blank line stops a
    little past `max_header_bytes`. A part without a blank line is all header (its body is
    empty), as in `headers.split_message`.
    """
    limit = min(end, start + limits.max_header_bytes + 4)
    header_end, body_start = headers.split_offsets(raw, start, limit)
    if header_end == body_start < end:  # no blank line before the limit, and more follows
        raise _header_too_large(limits)
    if header_end - start > limits.max_header_bytes:
        raise _header_too_large(limits)
    return raw[start:header_end], body_start


def _header_too_large(limits: Limits) -> UnsafeMessage:
    return UnsafeMessage(
        "A MIME part of the message has a header block larger than "
        f"{limits.max_header_bytes} bytes."
    )


def _boundary(params: Mapping[str, str]) -> bytes:
    boundary = params.get("boundary", "").rstrip()
    if not boundary:
        raise UnsafeMessage("A multipart part of the message has no boundary parameter.")
    return boundary.encode("utf-8", "replace")


def _child_ranges(
    raw: bytes, body_start: int, end: int, boundary: bytes
) -> Iterator[tuple[int, int]]:
    """(start, end) of each body part between the delimiter lines of one multipart.

    Yields as it scans, so a flood of delimiters meets the part budget early.
    """
    needle = b"--" + boundary
    pos = body_start
    open_at: int | None = None
    seen = False
    count = 0
    while True:
        found = lines.find_by(raw, needle, 0, pos, end)  # base64 holds no hyphen
        if found < 0:
            break
        line_end = _delimiter_line_end(raw, found, body_start, end, len(needle))
        if line_end is None:
            pos = found + 1
            continue
        closing = raw.startswith(b"--", found + len(needle), end)
        if open_at is not None:
            count += 1
            yield open_at, max(open_at, found - _line_break_before(raw, found, body_start))
        seen = True
        if closing:
            open_at = None
            break
        open_at = pos = line_end
    if open_at is not None:
        yield open_at, end
    elif not seen:
        raise UnsafeMessage(
            "A multipart part of the message never uses its boundary, so its parts cannot be found."
        )
    elif count == 0:
        raise UnsafeMessage("A multipart part of the message contains no parts.")


def _delimiter_line_end(raw: bytes, at: int, body_start: int, end: int, length: int) -> int | None:
    """End of the delimiter line at `at` (after its line break), or None if it is not one."""
    if at > body_start and raw[at - 1] != 0x0A:
        return None
    pos = at + length
    if raw.startswith(b"--", pos, end):
        pos += 2
    while pos < end and raw[pos] in b" \t":
        pos += 1
    if pos == end:
        return end
    if raw.startswith(CRLF, pos, end):
        return pos + 2
    if raw[pos] == 0x0A:
        return pos + 1
    return None


def _line_break_before(raw: bytes, at: int, lowest: int) -> int:
    if at - 2 >= lowest and raw.startswith(CRLF, at - 2, at):
        return 2
    if at - 1 >= lowest and raw[at - 1] == 0x0A:
        return 1
    return 0


# --- header parameters ---------------------------------------------------------------------


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    """Lower-case type and decoded parameters; an invalid type means text/plain (RFC 2045)."""
    text = _without_comments(value)
    match = _TYPE.match(text)
    if match is None:
        return "text/plain", _params(text[text.find(";") :] if ";" in text else "")
    kind = f"{match.group(1)}/{match.group(2)}".lower()
    return kind, _params(text[match.end() :])


def _disposition(value: str) -> tuple[str | None, dict[str, str]]:
    text = _without_comments(value)
    match = _DISPOSITION.match(text)
    if match is None:
        return None, _params(text[text.find(";") :] if ";" in text else "")
    return match.group(1).lower(), _params(text[match.end() :])


def _without_comments(value: str) -> str:
    """The value with (nested) comments outside quoted strings replaced by a space."""
    if len(value) > _MAX_PARAM_CHARS:
        raise UnsafeMessage(
            "A MIME part of the message has a content field longer than "
            f"{_MAX_PARAM_CHARS} characters."
        )
    if "(" not in value:
        return value
    kept: list[str] = []
    copied_to = 0
    depth = 0
    quoted = False
    for match in _COMMENT_SYNTAX.finditer(value):
        char = match.group(0)
        if quoted:
            quoted = char != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                copied_to = match.end()
        elif char == '"':
            quoted = True
        elif char == "(":
            kept.append(value[copied_to : match.start()] + " ")
            depth = 1
    if depth == 0:
        kept.append(value[copied_to:])
    return "".join(kept)


def _params(text: str) -> dict[str, str]:
    """Parameters after the type: quoted strings unquoted, RFC 2231 sections joined."""
    plain: dict[str, str] = {}
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for match in _PARAM.finditer(text):
        name = match.group(1).lower()
        raw_value = match.group(2).strip()
        if raw_value.startswith('"'):
            raw_value = _QUOTED_PAIR.sub(
                r"\1", raw_value[1:-1] if raw_value.endswith('"') else raw_value[1:]
            )
        section = _SECTION.fullmatch(name)
        if section is None:
            plain.setdefault(name, raw_value)
        elif section.group(2) is None:
            sections.setdefault(section.group(1), []).append((0, True, raw_value))
        else:
            number, extended = int(section.group(2)), bool(section.group(3))
            sections.setdefault(section.group(1), []).append((number, extended, raw_value))
    for name, parts in sections.items():
        plain[name] = _join_rfc2231(parts)
    return plain


def _join_rfc2231(parts: list[tuple[int, bool, str]]) -> str:
    charset = "us-ascii"
    chunks: list[bytes] = []
    seen: set[int] = set()
    for number, extended, value in sorted(parts, key=lambda part: part[0]):
        if number in seen:
            continue
        seen.add(number)
        if extended and number == 0 and value.count("'") >= 2:
            charset, _, value = value.split("'", 2)
        chunks.append(unquote_to_bytes(value) if extended else value.encode("utf-8", "replace"))
    joined = b"".join(chunks)
    codec = _codec(charset or "us-ascii")
    if codec is None or not codec[1]:
        return joined.decode("utf-8", "replace")
    try:
        return joined.decode(codec[0])
    except UnicodeDecodeError:
        return joined.decode("utf-8", "replace")


def _filename(value: str | None) -> str | None:
    """RFC 2047 decoded (Outlook quotes encoded words in names), control characters blanked."""
    if value is None:
        return None
    if "=?" in value and len(value) <= 4096:
        value = headers.decoded(value)
    value = headers.controls_blanked(value)
    return value or None


def _codec(charset: str) -> tuple[str, bool] | None:
    """(codec name, whether ASCII text keeps its bytes in it), or None for an unknown charset."""
    probe = "<>&;#/ azAZ09\r\n=-_.:"
    try:
        name = codecs.lookup(charset.strip().strip('"')).name
        encoded = probe.encode(name)
    except (LookupError, ValueError, UnicodeError):
        return None
    return name, name != "utf-7" and encoded == probe.encode("ascii")


# --- reading bodies and facts --------------------------------------------------------------


def decoded_body(raw: bytes, part: MimePart) -> bytes:
    """The body with its transfer encoding undone; unknown encodings are returned as is."""
    view = memoryview(raw)[part.body_start : part.end]
    if part.transfer_encoding == "base64":
        return _decode_base64(view)
    if part.transfer_encoding == "quoted-printable":
        return binascii.a2b_qp(view)
    return bytes(view)


def _decode_base64(data: memoryview) -> bytes:
    """Tolerant like the mail clients: stray characters skipped, missing padding added."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        alphabet = re.sub(rb"[^A-Za-z0-9+/]", b"", bytes(data))
        if len(alphabet) % 4 == 1:
            alphabet = alphabet[:-1]
        return binascii.a2b_base64(alphabet + b"=" * (-len(alphabet) % 4))


def decoded_size(raw: bytes, part: MimePart) -> int:
    """Size of the decoded body, measured without holding the decoded body in memory.

    Base64 is counted from its length (exact for well-formed base64), its white space
    counted a window at a time; quoted-printable is decoded a window of whole lines at a
    time (its escapes never span a line end) and only the lengths are kept. Decoding a
    25 MB attachment whole only to learn its size would cost a copy and a quarter second.
    """
    start, end = part.body_start, part.end
    if part.transfer_encoding == "base64":
        spaces = 0
        for low in range(start, end, _SIZE_WINDOW):
            spaces += len(raw[low : min(low + _SIZE_WINDOW, end)].translate(None, _NOT_SPACE))
        tail = raw[max(start, end - 16) : end].rstrip()
        padding = len(tail) - len(tail.rstrip(b"="))
        return max(0, (end - start - spaces) * 3 // 4 - padding)
    if part.transfer_encoding == "quoted-printable":
        size, view = 0, memoryview(raw)
        while start < end:
            cut = raw.rfind(b"\n", start, min(start + _SIZE_WINDOW, end)) + 1
            if cut == 0:
                cut = raw.find(b"\n", start, end) + 1 or end
            size += len(binascii.a2b_qp(view[start:cut]))
            start = cut
        return size
    return end - start


def part_facts(raw: bytes, root: MimePart) -> tuple[PartFacts, ...]:
    """What policy needs to know about each leaf part, in document order."""
    parts = {part.id: part for part in root.walk()}
    return tuple(
        PartFacts(
            id=part.id,
            content_type=part.content_type,
            filename=part.filename,
            size=decoded_size(raw, part),
            is_attachment=_is_attachment(part, parts),
        )
        for part in root.walk()
        if not part.children and not part.is_multipart
    )


def _parent(part: MimePart, parts: Mapping[str, MimePart]) -> MimePart | None:
    return parts[part.id.rpartition(".")[0]] if part.id else None


def _is_attachment(part: MimePart, parts: Mapping[str, MimePart]) -> bool:
    """Attachment unless it is a body, a body alternative or an inline related resource.

    A part with a Content-ID in multipart/related is what the HTML shows through "cid:";
    linking it would leave a broken image in the body, so it is not an attachment even with
    a file name, nor with ``Content-Disposition: attachment`` (Python's ``add_related`` and
    some mailers write that for pictures in the body).
    """
    if part.is_multipart:
        return False
    parent = _parent(part, parts)
    parent_type = parent.content_type if parent is not None else ""
    inline_related = parent_type == "multipart/related" and part.content_id is not None
    if inline_related:
        return False
    if part.disposition == "attachment" or part.filename is not None:
        return True
    if part.content_type in _BODY_TYPES:
        return False
    related_root = (
        parent is not None
        and parent_type == "multipart/related"
        and (parent.children[0].id == part.id)
    )
    return not (related_root or parent_type == "multipart/alternative")


def is_signed(root: MimePart) -> bool:
    """S/MIME or PGP/MIME anywhere outside attached messages: its bytes must not change."""
    return any(part.content_type in _SIGNED_TYPES for part in root.walk())


def _bodies(root: MimePart) -> tuple[MimePart | None, MimePart | None]:
    """The first text/plain and the first text/html part that are not attachments."""
    parts = {part.id: part for part in root.walk()}
    text = html = None
    for part in root.walk():
        if part.children or part.content_type not in _BODY_TYPES:
            continue
        if _is_attachment(part, parts):
            continue
        if part.content_type == "text/plain" and text is None:
            text = part
        elif part.content_type == "text/html" and html is None:
            html = part
    return text, html


# --- surgery -------------------------------------------------------------------------------


def _splice(raw: bytes, edits: list[_Edit]) -> bytes:
    """Apply non-overlapping (start, end, replacement) edits; equal starts keep their order."""
    view = memoryview(raw)
    chunks: list[bytes | memoryview] = []
    pos = 0
    for start, end, replacement in sorted(edits, key=lambda edit: (edit[0], edit[1])):
        if start < pos:
            raise RuntimeError(f"overlapping MIME edits at {start}")
        chunks.append(view[pos:start])
        chunks.append(replacement)
        pos = end
    chunks.append(view[pos:])
    return b"".join(chunks)


@dataclass(frozen=True)
class _HeaderLayout:
    block: bytes
    spans: tuple[tuple[HeaderField, int, int], ...]
    header_end: int
    has_blank: bool

    def named(self, name: str) -> list[tuple[HeaderField, int, int]]:
        return [span for span in self.spans if span[0].name == name]


def _layout(raw: bytes, part: MimePart) -> _HeaderLayout:
    block, _ = headers.split_message(raw[part.start : part.body_start])
    spans = []
    pos = part.start
    for header in headers.parse_fields(block) if block else []:
        spans.append((header, pos, pos + len(header.raw)))
        pos += len(header.raw)
    header_end = part.start + len(block)
    return _HeaderLayout(block, tuple(spans), header_end, header_end < part.body_start)


def _delimiter_start(raw: bytes, parent: MimePart, child: MimePart) -> int:
    return raw.rfind(b"--" + _boundary(parent.params), parent.body_start, child.start)


def _next_delimiter(raw: bytes, parent: MimePart, index: int) -> int | None:
    """Start of the delimiter line after child `index`, or None when the close is missing."""
    if index + 1 < len(parent.children):
        return _delimiter_start(raw, parent, parent.children[index + 1])
    after = parent.children[index].end
    after += 2 if raw.startswith(CRLF, after) else 1 if raw.startswith(b"\n", after) else 0
    return after if raw.startswith(b"--" + _boundary(parent.params), after, parent.end) else None


def remove_parts(raw: bytes, root: MimePart, part_ids: Collection[str]) -> bytes:
    """`raw` without the named parts, each taken out with its delimiter line.

    Nothing else changes. A multipart that would lose all its parts instead gets one empty
    ``text/plain; charset=utf-8`` part in their place, so it stays well formed. Naming the
    root of a single-part message keeps its header fields but replaces its Content-* fields
    by that same empty text part's Content-Type and drops the body; the root of a multipart
    cannot be named. Naming a part and one inside it removes the outer one. Unknown ids
    raise ValueError.
    """
    if isinstance(part_ids, str):
        raise TypeError("part_ids must be a collection of ids, not one string")
    parts = {part.id: part for part in root.walk()}
    unknown = sorted(set(part_ids) - parts.keys())
    if unknown:
        raise ValueError(f"no MIME part with id {', '.join(map(repr, unknown))}")
    wanted = set(part_ids)
    if "" in wanted:
        if root.children or root.is_multipart:
            raise ValueError("the root multipart cannot be removed; name its parts")
        top, _ = _rebuilt_top(raw, root, [_EMPTY_TEXT_PART])
        return top
    wanted = {pid for pid in wanted if not _has_ancestor_in(pid, wanted)}
    edits: list[_Edit] = []
    for parent_id in sorted({pid.rpartition(".")[0] for pid in wanted}):
        parent = parts[parent_id]
        indexes = [i for i, child in enumerate(parent.children) if child.id in wanted]
        if len(indexes) == len(parent.children):
            first = _delimiter_start(raw, parent, parent.children[0])
            empty = b"--" + _boundary(parent.params) + CRLF + _EMPTY_TEXT_PART + CRLF
            edits.append((first, parent.children[-1].end, empty))
            continue
        for index in indexes:
            child = parent.children[index]
            begin = _delimiter_start(raw, parent, child)
            following = _next_delimiter(raw, parent, index)
            if following is not None:
                edits.append((begin, following, b""))
            else:
                edits.append(
                    (begin - _line_break_before(raw, begin, parent.body_start), child.end, b"")
                )
    return _splice(raw, _merged(edits))


def replace_parts(raw: bytes, root: MimePart, pieces: Mapping[str, Sequence[bytes]]) -> bytes:
    """`raw` with each named part of a multipart replaced by its pieces, whole parts (header
    block, blank line, body without a final line break) that stand in its place as siblings.

    Nothing else changes. The root, a part inside another named one, or a part replaced by
    nothing (remove_parts takes parts out) raise ValueError.
    """
    parts = {part.id: part for part in root.walk()}
    edits: list[_Edit] = []
    for part_id, replacement in pieces.items():
        if part_id not in parts or not part_id or not replacement:
            raise ValueError(f"cannot replace MIME part {part_id!r} by {len(replacement)} parts")
        if _has_ancestor_in(part_id, set(pieces)):
            raise ValueError(f"MIME part {part_id!r} is inside another one replaced")
        parent = parts[part_id.rpartition(".")[0]]
        delimiter = CRLF + b"--" + _boundary(parent.params) + CRLF
        part = parts[part_id]
        edits.append((part.start, part.end, delimiter.join(replacement)))
    return _splice(raw, edits)


def _has_ancestor_in(part_id: str, ids: set[str]) -> bool:
    while part_id:
        part_id = part_id.rpartition(".")[0]
        if part_id in ids and part_id:
            return True
    return False


def _merged(deletions: list[_Edit]) -> list[_Edit]:
    """Overlapping deletions (a last part without close delimiter and its neighbour) as one."""
    merged: list[_Edit] = []
    for start, end, replacement in sorted(deletions, key=lambda edit: (edit[0], edit[1])):
        if merged and not replacement and not merged[-1][2] and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), b"")
        else:
            merged.append((start, end, replacement))
    return merged


def _rebuilt_top(raw: bytes, root: MimePart, new_fields: list[bytes]) -> tuple[bytes, list[bytes]]:
    """The root's header block and blank line with Content-* fields swapped for `new_fields`.

    Every other field is copied byte for byte, in order; the new fields stand where the
    first Content-* field stood (or at the end). Also returns the removed Content-* fields.
    """
    layout = _layout(raw, root)
    moved = [header.raw for header, _, _ in layout.spans if header.name.startswith("content-")]
    if not layout.named("mime-version"):
        new_fields = [headers.format_field("MIME-Version", "1.0"), *new_fields]
    kept: list[bytes] = []
    placed = False
    for header, _, _ in layout.spans:
        if header.name.startswith("content-"):
            if not placed:
                kept.extend(new_fields)
                placed = True
            continue
        kept.append(header.raw if header.raw.endswith(b"\n") else header.raw + CRLF)
    if not placed:
        kept.extend(new_fields)
    blank = raw[layout.header_end : root.body_start] if layout.has_blank else CRLF
    return b"".join(kept) + blank, moved


def add_link_block(raw: bytes, root: MimePart, text_block: str, html_block: str) -> bytes:
    """`raw` with `text_block` at the end of the text body and `html_block` in the HTML body.

    The bodies are the first text/plain and the first text/html part that are not
    attachments. The HTML block goes before the last ``</body>`` (any case), else at the end;
    the text block after the text, separated by an empty line. Line breaks become CRLF.

    Charsets — the agent's text is never altered:

    - If the body's charset can encode the block, the encoded block is inserted as is.
    - HTML whose charset cannot: characters it lacks become character references
      (``&#8364;``), in any ASCII-compatible or unknown charset; the charset stays.
    - Text whose (known) charset cannot: the body is decoded strictly and re-encoded as
      UTF-8, and only the charset parameter of its Content-Type field changes (or is added).
      The text is the same text, its bytes are UTF-8 (unchanged for ASCII bodies).
    - Text without a charset parameter whose bytes are not ASCII is read as UTF-8, else
      Windows-1252 (as the relay reads undeclared header bytes) when that reads like Western
      text, and re-encoded as above; otherwise (Greek, Cyrillic) as in the next case.
    - Text whose charset is unknown, whose bytes are not valid in the declared charset, or
      whose charset parameter cannot be edited safely (RFC 2231 form, duplicates): the
      block is transliterated to ASCII (ä → ae, é → e, others → ?) and appended.
    - Bodies in charsets that do not keep ASCII bytes (UTF-7, UTF-16, UTF-32, EBCDIC) are
      never touched: their own bytes can hide line breaks and dots (UTF-7 ``+AAoALgANAAo-``
      is LF "." CR LF) that re-encoding would put on the wire as bare LF, which is what
      SMTP smuggling is made of.

    Transfer encodings: 7bit, 8bit and binary bodies get the block spliced into their bytes;
    one whose result would hold a bare CR or LF, 8-bit bytes in 7bit, or lines over 998
    octets (not in binary) is re-encoded as quoted-printable and its
    Content-Transfer-Encoding field replaced (or added), so every line written ends in CRLF.
    Base64 and quoted-printable bodies are decoded, changed and re-encoded in the same
    encoding (76 character base64 lines). No other header field of a body part changes; a
    root that gains a Content-* field also gains ``MIME-Version: 1.0`` if it had none. Bodies
    in other transfer encodings are skipped.

    When a body that exists cannot take its block, or there is no body, the text block goes
    into a new ``text/plain; charset=utf-8`` quoted-printable part of its own (also when the
    other body took its block): as the first part of a multipart/mixed root; otherwise the
    message is wrapped. Wrapping keeps every top-level field byte for byte except the
    Content-* fields (Content-Type, -Transfer-Encoding, -Disposition, -ID, -Description
    ...): those move, byte for byte and in order, to the header of the original content,
    which becomes the second part of a new multipart/mixed whose Content-Type (fresh
    boundary, absent from the message) stands where the first Content-* field stood; the new
    text part is the first.
    """
    text_part, html_part = _bodies(root)
    edits: list[_Edit] = []
    missed = False
    for part, block, html in ((text_part, text_block, False), (html_part, html_block, True)):
        if part is None or not block:
            continue
        found = _body_edits(raw, root, part, block, html=html)
        missed = missed or found is None
        edits.extend(found or [])
    if edits:
        raw = _splice(raw, edits)
        if not missed:
            return raw
        root = parse(raw)
    if not text_block:
        return raw
    return _with_text_part(raw, root, text_block)


def _with_text_part(raw: bytes, root: MimePart, text_block: str) -> bytes:
    """`raw` with the text block in a new part of its own: first in a mixed root, or wrapped."""
    if root.content_type == "multipart/mixed" and root.children:
        first = _delimiter_start(raw, root, root.children[0])
        part = b"--" + _boundary(root.params) + CRLF + _new_text_part(text_block) + CRLF
        return _splice(raw, [(first, first, part)])
    return _wrapped(raw, root, text_block)


def _new_text_part(block: str) -> bytes:
    return (
        _EMPTY_TEXT_PART
        + b"Content-Transfer-Encoding: quoted-printable"
        + CRLF
        + CRLF
        + _encode_qp(_crlf_text(block, final=True).encode("utf-8"))
    )


def _wrapped(raw: bytes, root: MimePart, block: str) -> bytes:
    boundary = _fresh_boundary(raw)
    content_type = headers.format_field("Content-Type", f'multipart/mixed; boundary="{boundary}"')
    top, moved = _rebuilt_top(raw, root, [content_type])
    delimiter = b"--" + boundary.encode("ascii")
    moved_block = b"".join(line if line.endswith(b"\n") else line + CRLF for line in moved)
    return b"".join(
        [
            top,
            delimiter + CRLF + _new_text_part(block) + CRLF,
            delimiter + CRLF + moved_block + CRLF,
            memoryview(raw)[root.body_start :],
            CRLF + delimiter + b"--" + CRLF,
        ]
    )


def _fresh_boundary(raw: bytes) -> str:
    """A boundary absent from the message; "=_" cannot even occur in base64 or quoted-printable."""
    while True:
        boundary = f"=_sealrelay_{secrets.token_hex(16)}"
        if raw.find(boundary.encode("ascii")) < 0:
            return boundary


def _crlf_text(text: str, *, final: bool) -> str:
    text = _TEXT_LINE_BREAK.sub("\r\n", text)
    return text + "\r\n" if final and not text.endswith("\r\n") else text


def _transliterated(text: str) -> str:
    out = []
    for char in text.translate(_TRANSLITERATION):
        if char.isascii():
            out.append(char)
        else:
            plain = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode("ascii")
            out.append(plain or "?")
    return "".join(out)


def _text_with_block(text: str, block: str) -> str:
    if not text:
        return block
    return text + ("\r\n" if text.endswith("\n") else "\r\n\r\n") + block


def _body_edits(
    raw: bytes, root: MimePart, part: MimePart, block: str, *, html: bool
) -> list[_Edit] | None:
    """Edits that put `block` into body `part`, or None when this body cannot take it."""
    if part.transfer_encoding not in _KNOWN_ENCODINGS:
        return None
    block = _crlf_text(block, final=not html)
    layout = _layout(raw, part)
    codec = _codec(part.params.get("charset") or "us-ascii")
    body = decoded_body(raw, part)
    content_type_field = layout.named("content-type")
    utf8_field = (
        _utf8_content_type(part, content_type_field[0][0].raw) if content_type_field else None
    )
    can_switch = bool(utf8_field) or not content_type_field

    if codec is not None and not codec[1]:
        # A charset that does not keep ASCII bytes (UTF-7, UTF-16, EBCDIC) hides line breaks
        # and dots in its own bytes: re-encoding them could put a bare LF on the wire.
        return None
    charset = codec[0] if codec is not None else "ascii"
    try:
        addition = block.encode(charset, "xmlcharrefreplace" if html else "strict")
    except UnicodeEncodeError:
        undeclared = "charset" not in part.params
        text = (
            _strict_decode(body, charset, undeclared=undeclared)
            if can_switch and codec is not None
            else None
        )
        if text is None:
            addition = _transliterated(block).encode(charset, "replace")
        else:
            new_body = _text_with_block(text, block).encode("utf-8")
            return _rewrite_body(raw, root, part, layout, new_body, utf8_field, switch=True)
    if html:
        ends = list(_HTML_BODY_END.finditer(body))
        at = ends[-1].start() if ends else len(body)
    else:
        at = len(body)
        if body:
            addition = (CRLF if body.endswith(b"\n") else CRLF + CRLF) + addition
    line_start = body.rfind(b"\n", 0, at) + 1
    line_end = len(body) if (found := body.find(b"\r\n", at)) < 0 else found
    joined_line = body[line_start:at] + addition + body[at:line_end]
    if not _needs_qp(part.transfer_encoding, joined_line) and (
        part.transfer_encoding in _IDENTITY_ENCODINGS
    ):
        insert = (part.body_start + at, part.body_start + at, addition)
        return [*_header_edits(raw, root, part, layout, []), insert]
    new_body = body[:at] + addition + body[at:]
    return _rewrite_body(raw, root, part, layout, new_body, None, switch=False)


def _strict_decode(body: bytes, codec: str, *, undeclared: bool) -> str | None:
    """The body as text, or None. Without a charset parameter the text is US-ASCII by
    RFC 2045, but 8-bit bytes there are what a script or scanner wrote in its own charset:
    read as the relay reads undeclared header bytes (UTF-8, else Windows-1252), as long as
    what Windows-1252 makes of them reads like Western text (`_western`)."""
    try:
        return body.decode(codec)
    except UnicodeDecodeError:
        pass
    if not undeclared:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = body.decode("cp1252")
    except UnicodeDecodeError:
        return None
    return text if _western(body) else None


def _western(body: bytes) -> bool:
    """Whether `body`, read as Windows-1252, is likely what was written: German, French or
    Spanish keep most letters ASCII ("Grüße aus München": 3 of 14 are not, "Müßig" 2 of 5).
    Greek or Cyrillic bytes read so become nothing but accented letters ("Ïðèâåò"); declared
    UTF-8 they would be garbage for good, so such a body keeps its bytes and the receiver's
    guess. Counted by `translate`, at C speed: a body may be megabytes."""
    ascii_letters = len(body) - len(body.translate(None, _ASCII_LETTERS))
    other_letters = len(body) - len(body.translate(None, _CP1252_LETTERS))
    return other_letters <= ascii_letters


def _needs_qp(encoding: str, added: bytes) -> bool:
    """Whether bytes written as they are would break the part's encoding or the line rules.

    Every line the relay writes ends in CRLF: a bare CR or LF is what SMTP smuggling is made
    of, so such bytes go out quoted-printable, as do 8-bit bytes in a 7bit part and lines
    over 998 octets.
    """
    if encoding not in _IDENTITY_ENCODINGS:
        return False
    if headers.has_bare_line_end(added):
        return True
    if encoding == "binary":
        return False
    too_long = any(len(line) > _MAX_LINE for line in _LINE_BREAK.split(added))
    return too_long or (encoding == "7bit" and not added.isascii())


def _rewrite_body(
    raw: bytes,
    root: MimePart,
    part: MimePart,
    layout: _HeaderLayout,
    new_body: bytes,
    utf8_field: bytes | None,
    *,
    switch: bool,
) -> list[_Edit]:
    """Replace the body with `new_body` encoded in the part's transfer encoding.

    A 7bit, 8bit or binary body that its encoding can no longer carry with CRLF lines only
    becomes quoted-printable; `switch` also sets the charset parameter to utf-8 (editing the
    field's bytes or adding a Content-Type field).
    """
    encoding = part.transfer_encoding
    if _needs_qp(encoding, new_body):
        encoding = "quoted-printable"
    if encoding == "base64":
        encoded = base64_lines(new_body)
    elif encoding == "quoted-printable":
        encoded = _encode_qp(new_body)
    else:
        encoded = new_body
    field_edits: list[_Edit] = []
    additions: list[bytes] = []
    if encoding != part.transfer_encoding:
        cte = headers.format_field("Content-Transfer-Encoding", encoding)
        field_edits, added = _replace_field(layout, "content-transfer-encoding", cte)
        additions += added
    if switch:
        current = layout.named("content-type")
        if current and utf8_field is not None:
            _, start, end = current[0]
            field_edits.append((start, end, utf8_field))
        elif not current:
            generated = headers.format_field("Content-Type", f"{part.content_type}; charset=utf-8")
            additions.append(generated)
    edits = _header_edits(raw, root, part, layout, additions) + field_edits
    edits.append((part.body_start, part.end, encoded))
    return edits


def _replace_field(
    layout: _HeaderLayout, name: str, generated: bytes
) -> tuple[list[_Edit], list[bytes]]:
    """Edits replacing the first `name` field and dropping repeats, or the field to add."""
    found = layout.named(name)
    if not found:
        return [], [generated]
    edits: list[_Edit] = []
    for number, (header, start, end) in enumerate(found):
        replacement = generated if header.raw.endswith(b"\n") else generated[:-2]
        edits.append((start, end, replacement if number == 0 else b""))
    return edits, []


def _header_edits(
    raw: bytes, root: MimePart, part: MimePart, layout: _HeaderLayout, additions: list[bytes]
) -> list[_Edit]:
    """Fields to add at the end of the part's header block, and the blank line if it has none."""
    if part.id == root.id and additions and not layout.named("mime-version"):
        additions = [headers.format_field("MIME-Version", "1.0"), *additions]
    if layout.has_blank and not additions:
        return []
    prefix = CRLF if layout.block and not layout.block.endswith(b"\n") else b""
    blank = b"" if layout.has_blank else CRLF
    return [(layout.header_end, layout.header_end, prefix + b"".join(additions) + blank)]


def _utf8_content_type(part: MimePart, field_raw: bytes) -> bytes | None:
    """The Content-Type field with charset=utf-8, or None if its bytes cannot be edited safely."""
    matches = list(_CHARSET_PARAM.finditer(field_raw))
    words = len(_CHARSET_WORD.findall(field_raw))
    if not matches:
        if words:
            return None
        line = field_raw.rstrip(b"\r\n")
        return line + b"; charset=utf-8" + field_raw[len(line) :]
    if len(matches) != 1 or words != 1:
        return None
    value = matches[0].group(2)
    if (
        value.strip(b'"').decode("ascii", "replace").lower()
        != part.params.get("charset", "").lower()
    ):
        return None
    new_value = b'"utf-8"' if value.startswith(b'"') else b"utf-8"
    return field_raw[: matches[0].start(2)] + new_value + field_raw[matches[0].end(2) :]


def base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 76 characters, each ending in CRLF (RFC 2045 section 6.8)."""
    lines = [binascii.b2a_base64(data[i : i + 57], newline=False) for i in range(0, len(data), 57)]
    return CRLF.join(lines) + (CRLF if lines else b"")


def _encode_qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks; a lone CR is kept as =0D, a lone LF ends a line."""
    lines = []
    for line in _LINE_BREAK.split(data):
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=True, header=False)
        lines.append(encoded.replace(b"\r", b"=0D").replace(b"\n", CRLF))
    return CRLF.join(lines)


_FORWARDED_TYPES = frozenset({"message/rfc822", "message/global"})
_FORWARDED_NAME_MAX = 120


def name_for_unnamed(raw: bytes, part: MimePart) -> str:
    """What a part without a filename is offered to a prospect as. Some clients attach a
    forwarded message with no name: it goes by its Subject, as mail programs show it, not
    as "attachment-2.eml"; anything else by its place and type."""
    if part.content_type in _FORWARDED_TYPES:
        inner = decoded_body(raw, part)
        subject = headers.decoded(headers.first_value(headers.fields_of(inner), "subject") or "")
        if subject := " ".join(subject.split())[:_FORWARDED_NAME_MAX]:
            return f"{subject}.eml"
    extension = mimetypes.guess_extension(part.content_type) or ".bin"
    return f"attachment-{part.id}{extension}"
