"""TNEF streams as Outlook writes them ([MS-OXTNEF] 2.1.3), for tests of winmail.dat.

tnefparse reads what this writes the same way (tests/mail/test_tnef.py checks), so a test
stream is no private dialect of the reader under test.
"""

from __future__ import annotations

import email.policy
import struct
from dataclasses import dataclass
from email.message import EmailMessage

SIGNATURE = 0x223E9F78
NOTE = "IPM.Microsoft Mail.Note"
MEETING_REQUEST = "IPM.Microsoft Schedule.MtgReq"

STRING8, UNICODE, BINARY, LONG, SHORT = 0x001E, 0x001F, 0x0102, 0x0003, 0x0002
MULTI = 0x1000
LONG_FILENAME, MIME_TAG, ATTACH_METHOD, DATA_BIN, DISPLAY_NAME = (
    0x3707,
    0x370E,
    0x3705,
    0x3701,
    0x3001,
)


@dataclass(frozen=True)
class Attachment:
    data: bytes
    title: str | None = None  # attAttachTitle, the 8.3 name in the OEM code page
    long_filename: str | None = None  # PidTagAttachLongFilename, as Unicode
    mime_tag: str | None = None
    method: int = 1  # 1 by value, 5 an Outlook item, 6 an OLE object
    data_as_property: bool = False  # PidTagAttachDataBinary instead of attAttachData
    raw_properties: bytes | None = None  # attAttachment's data as given, not written here


def attribute(level: int, type_: int, id_: int, data: bytes, *, checksum: bool = True) -> bytes:
    head = struct.pack("<BII", level, (type_ << 16) | id_, len(data))
    tail = struct.pack("<H", sum(data) & 0xFFFF) if checksum else b""
    return head + data + tail


def padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def variable(type_: int, pid: int, value: bytes) -> bytes:
    return struct.pack("<HHII", type_, pid, 1, len(value)) + padded(value)


def long(pid: int, value: int) -> bytes:
    return struct.pack("<HHi", LONG, pid, value)


def unicode(pid: int, text: str) -> bytes:
    return variable(UNICODE, pid, (text + "\x00").encode("utf-16-le"))


def properties(*encoded: bytes) -> bytes:
    return struct.pack("<I", len(encoded)) + b"".join(encoded)


def stream(
    attachments: list[Attachment],
    message_class: str = NOTE,
    codepage: int = 1252,
) -> bytes:
    out = [struct.pack("<IH", SIGNATURE, 0x1234)]
    out.append(attribute(1, 0x0008, 0x9006, struct.pack("<I", 0x00010000)))
    out.append(attribute(1, 0x0006, 0x9007, struct.pack("<II", codepage, 0)))
    out.append(attribute(1, 0x0007, 0x8008, message_class.encode("ascii") + b"\x00"))
    for item in attachments:
        out.append(attribute(2, 0x0006, 0x9002, struct.pack("<HiHHI", 1, -1, 0, 0, 0)))
        if item.title is not None:
            title = item.title.encode(f"cp{codepage}") + b"\x00"
            out.append(attribute(2, 0x0001, 0x8010, title))
        if not item.data_as_property:
            out.append(attribute(2, 0x0006, 0x800F, item.data))
        props = [long(ATTACH_METHOD, item.method)]
        if item.long_filename is not None:
            props.append(unicode(LONG_FILENAME, item.long_filename))
        if item.mime_tag is not None:
            props.append(variable(STRING8, MIME_TAG, item.mime_tag.encode("ascii") + b"\x00"))
        if item.data_as_property:
            props.append(variable(BINARY, DATA_BIN, item.data))
        block = properties(*props) if item.raw_properties is None else item.raw_properties
        out.append(attribute(2, 0x0006, 0x9005, block))
    return b"".join(out)


def outlook_mail(winmail: bytes, *, sender: str, to: str, subject: str, text: str) -> bytes:
    """As Outlook sends a message written in Rich Text: the text, then winmail.dat."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    message.add_attachment(
        winmail, maintype="application", subtype="ms-tnef", filename="winmail.dat"
    )
    return message.as_bytes(policy=email.policy.SMTP)
