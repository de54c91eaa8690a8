"""The files inside Outlook's winmail.dat (TNEF, [MS-OXTNEF]).

Outlook sends a message written in Rich Text as a text body plus one application/ms-tnef
part named winmail.dat that carries the formatting and every attachment. A phone cannot
open it: gateway/mail/winmail.py puts these files in its place.

Read here, not with tnefparse: that library believes the counts in the stream (one
multi-valued property claiming 2^32 values appends entries until memory runs out), and a
relay reads whatever an agent forwards. Every read here is checked against the bytes left,
so no loop runs longer than the stream is long.

Only a plain note whose attachments are all plain files is unpacked. A meeting request,
contact or task, and an attachment that is an Outlook item or an OLE object, mean that
the stream holds more than its files: it is kept whole, which loses nothing.
"""

from __future__ import annotations

import codecs
import mimetypes
import re
import struct
from dataclasses import dataclass, field

from gateway.mail import headers

SIGNATURE = 0x223E9F78
TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})

_MESSAGE, _ATTACHMENT = 1, 2
_HEADER = 9  # level, id, length; fewer bytes at the end are trailing garbage
# attribute ids (the low 16 bits of an attribute's id; the high ones name its type)
_MESSAGE_CLASS = 0x8008
_OEM_CODEPAGE = 0x9007
_ATTACH_DATA = 0x800F
_ATTACH_TITLE = 0x8010
_ATTACH_REND_DATA = 0x9002
_ATTACHMENT_PROPS = 0x9005
# MAPI property ids in an attachment's properties
_DISPLAY_NAME = 0x3001
_ATTACH_DATA_BIN = 0x3701
_ATTACH_FILENAME = 0x3704
_ATTACH_METHOD = 0x3705
_ATTACH_LONG_FILENAME = 0x3707
_ATTACH_MIME_TAG = 0x370E
_BY_VALUE = 1

_MULTI_VALUE = 0x1000
_FIXED_SIZES = {0x0002: 2, 0x000B: 2, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x0001: 0}
_FIXED_SIZES.update({0x0005: 8, 0x0006: 8, 0x0007: 8, 0x0014: 8, 0x0040: 8, 0x0048: 16})
_STRING8, _UNICODE, _BINARY, _OBJECT, _UNSPECIFIED = 0x001E, 0x001F, 0x0102, 0x000D, 0x0000
_VARIABLE = frozenset({_STRING8, _UNICODE, _BINARY, _OBJECT, _UNSPECIFIED})
_SHORTS = frozenset({0x0002, 0x000B})

_MIME_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")
# TNEF writes a note's class the old way ("IPM.Microsoft Mail.Note"), MAPI the new one
_NOTE = re.compile(r"IPM\.(Microsoft Mail\.)?Note(\.|$)")


class Unreadable(ValueError):
    """Not a TNEF stream, or one cut short or with a count larger than its bytes."""


@dataclass(frozen=True)
class CarriedFile:
    filename: str
    content_type: str
    data: bytes


def is_tnef(content_type: str, filename: str | None) -> bool:
    """Outlook labels it application/ms-tnef; a client that lost the type still names it."""
    return content_type.lower() in TNEF_TYPES or (filename or "").lower() == "winmail.dat"


def carried_files(stream: bytes) -> list[CarriedFile] | None:
    """The files of a plain note, in their order; None when the stream should stay whole
    (not a note, a part that is no plain file, no file at all). Raises Unreadable."""
    reader = _Reader(memoryview(stream))
    if reader.u32() != SIGNATURE:
        raise Unreadable("no TNEF signature")
    reader.take(2)  # the attachment key, which only Exchange reads
    codec = "cp1252"
    message_class = ""
    attachments: list[_Attachment] = []
    while reader.left >= _HEADER:
        level, attribute, data = reader.attribute()
        kind = attribute & 0xFFFF
        if level == _MESSAGE and kind == _MESSAGE_CLASS:
            message_class = _text(data, codec)
        elif level == _MESSAGE and kind == _OEM_CODEPAGE and len(data) >= 4:
            codec = _codec(struct.unpack_from("<I", data)[0])
        elif level == _ATTACHMENT and kind == _ATTACH_REND_DATA:
            attachments.append(_Attachment())
        elif level == _ATTACHMENT and attachments:
            attachments[-1].add(kind, data, codec)
    if message_class and not _NOTE.match(message_class):
        return None
    if not attachments or not all(a.plain_file for a in attachments):
        return None
    return [a.carried(index) for index, a in enumerate(attachments, start=1)]


@dataclass
class _Attachment:
    title: str = ""
    data: bytes | None = None
    properties: dict[int, object] = field(default_factory=dict)

    def add(self, kind: int, data: memoryview, codec: str) -> None:
        if kind == _ATTACH_TITLE:
            self.title = _text(data, codec)
        elif kind == _ATTACH_DATA:
            self.data = bytes(data)
        elif kind == _ATTACHMENT_PROPS:
            self.properties.update(_properties(data, codec))

    @property
    def plain_file(self) -> bool:
        method = self.properties.get(_ATTACH_METHOD, _BY_VALUE)
        return method == _BY_VALUE and self.content is not None

    @property
    def content(self) -> bytes | None:
        if self.data is not None:
            return self.data
        value = self.properties.get(_ATTACH_DATA_BIN)
        return value if isinstance(value, bytes) else None

    def carried(self, index: int) -> CarriedFile:
        names = (_ATTACH_LONG_FILENAME, _ATTACH_FILENAME, _DISPLAY_NAME)
        named = [self.properties.get(key) for key in names]
        name = next((_base_name(n) for n in named if isinstance(n, str) and _base_name(n)), "")
        name = name or _base_name(self.title)
        tag = self.properties.get(_ATTACH_MIME_TAG)
        if isinstance(tag, str) and _MIME_TYPE.fullmatch(tag.strip()):
            content_type = tag.strip().lower()
        else:
            content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if not name:
            name = f"attachment-{index}{mimetypes.guess_extension(content_type) or '.bin'}"
        content = self.content
        assert content is not None  # plain_file was checked
        return CarriedFile(name, content_type, content)


class _Reader:
    """Reads little-endian values from a view, refusing to read past its end."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.view) - self.at

    def take(self, size: int) -> memoryview:
        if size < 0 or size > self.left:
            raise Unreadable(f"{size} bytes wanted at {self.at}, {self.left} left")
        piece = self.view[self.at : self.at + size]
        self.at += size
        return piece

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def attribute(self) -> tuple[int, int, memoryview]:
        """Level, id and data of the next attribute. Its checksum is not checked, and may
        be cut off at the end of the stream: the data before it is whole."""
        level = self.take(1)[0]
        attribute = self.u32()
        data = self.take(self.u32())
        self.take(min(2, self.left))
        return level, attribute, data

    def padded(self, size: int) -> memoryview:
        piece = self.take(size)
        self.take(-size % 4)
        return piece


def _properties(data: memoryview, codec: str) -> dict[int, object]:
    """An attribute's MAPI properties by id: the last value of each that is a number,
    text or bytes; named properties and the rest are read past."""
    reader = _Reader(data)
    found: dict[int, object] = {}
    for _ in range(reader.u32()):
        kind, pid = reader.u16(), reader.u16()
        if pid >= 0x8000:
            reader.take(16)
            if reader.u32() == 0:
                reader.take(4)
            else:
                reader.padded(reader.u32())
        multi = bool(kind & _MULTI_VALUE)
        kind &= ~_MULTI_VALUE
        count = reader.u32() if multi or kind in _VARIABLE else 1
        if kind in _VARIABLE:
            for _ in range(count):
                value = reader.padded(reader.u32())
                found[pid] = _value(kind, value, codec)
        elif kind in _FIXED_SIZES:
            values = reader.take(_FIXED_SIZES[kind] * count)
            if kind in _SHORTS and count % 2:
                reader.take(2)
            if kind == 0x0003 and count == 1:
                found[pid] = int(struct.unpack("<i", values)[0])
        else:
            raise Unreadable(f"unknown MAPI type {kind:#06x}")
    return found


def _value(kind: int, value: memoryview, codec: str) -> object:
    if kind == _UNICODE:
        return bytes(value).decode("utf-16-le", "replace").split("\x00", 1)[0]
    if kind == _STRING8:
        return _text(value, codec)
    return bytes(value)


def _text(data: memoryview, codec: str) -> str:
    return bytes(data).split(b"\x00", 1)[0].decode(codec, "replace")


def _codec(codepage: int) -> str:
    """Outlook names the code page of its 8-bit strings by number."""
    name = "utf-8" if codepage == 65001 else f"cp{codepage}"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "cp1252"


def _base_name(name: str) -> str:
    """Without a folder Outlook may leave in front of it, control characters blanked."""
    base = re.split(r"[\\/]", name)[-1]
    return headers.controls_blanked(base).strip()
