"""A message with its winmail.dat unpacked into the files it carries.

Copies to people outside the brokerage are made from this (rules/winmail.py; links and
registered letters too), so a prospect gets the offer as a PDF, not inside a file a phone
cannot open, and the policy sees the real files: a big PDF is linked, a floor plan beside it
stays attached, as would a calendar invitation. Colleagues' copies keep the winmail.dat as
the agent's Outlook wrote it, and so does a signed message, whose bytes must not change.
"""

from __future__ import annotations

import email.policy
import logging
from dataclasses import dataclass
from email.message import MIMEPart

from gateway.mail import mime, tnef

log = logging.getLogger(__name__)

# parts that take bytes as a file; a carried file claiming another type goes as a plain file
_FILE_TYPES = ("application", "audio", "font", "image", "model", "text", "video")


@dataclass(frozen=True)
class Unpacked:
    raw: bytes
    root: mime.MimePart
    files: tuple[str, ...]  # the names of the files now in the message, in order


def unpacked(raw: bytes, root: mime.MimePart, message_id: str) -> Unpacked | None:
    """The message with each unpackable winmail.dat replaced by its files; None when there
    is none (or the message is signed). Only one among the attachments of a multipart/mixed,
    where Outlook puts it: in an alternative or related part its files would be taken for
    another view of the body."""
    if mime.is_signed(root):
        return None
    pieces: dict[str, list[bytes]] = {}
    names: list[str] = []
    for part in _attachments_of_mixed(root):
        if part.children or not tnef.is_tnef(part.content_type, part.filename):
            continue
        try:
            carried = tnef.carried_files(mime.decoded_body(raw, part))
        except tnef.Unreadable as exc:
            log.info("message %s: winmail.dat kept, unreadable: %s", message_id, exc)
            continue
        if carried:
            pieces[part.id] = [_part(file) for file in carried]
            names += [file.filename for file in carried]
    if not pieces:
        return None
    new_raw = mime.replace_parts(raw, root, pieces)
    try:
        return Unpacked(new_raw, mime.parse(new_raw), tuple(names))
    except mime.UnsafeMessage as exc:  # more files than a message may have parts
        log.info("message %s: winmail.dat kept: %s", message_id, exc)
        return None


def _attachments_of_mixed(root: mime.MimePart) -> list[mime.MimePart]:
    return [
        child
        for part in root.walk()
        if part.content_type == "multipart/mixed"
        for child in part.children
    ]


def _part(file: tnef.CarriedFile) -> bytes:
    """An attachment part, its name in RFC 2231 form where it needs it. The standard library
    writes the fields; the body is encoded apart, as its generator writes base64 a line at a
    time in Python (0.3 s for 20 MB, on the event loop)."""
    maintype, _, subtype = file.content_type.partition("/")
    if maintype not in _FILE_TYPES:
        maintype, subtype = "application", "octet-stream"
    head = MIMEPart()
    head.set_content(
        b"", maintype=maintype, subtype=subtype, disposition="attachment", filename=file.filename
    )
    fields = head.as_bytes(policy=email.policy.SMTP).removesuffix(b"\r\n")
    if not file.data:
        return fields
    return fields + b"\r\n" + mime.base64_lines(file.data).removesuffix(b"\r\n")
