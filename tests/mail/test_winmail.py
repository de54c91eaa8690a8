"""A winmail.dat replaced by the files it carries, every other byte of the message kept."""

from __future__ import annotations

import email
import email.policy
import os
from email.message import EmailMessage

import pytest

from gateway.mail import headers, mime, winmail
from tests.mail import tnef_stream as w
from tests.mail.tnef_stream import Attachment

PDF = b"%PDF-1.7\n" + os.urandom(20_000)
LONG_NAME = "Exposé Müllerstraße 12, Erdgeschoss links, mit Garten und Garage " * 3 + ".pdf"


def rich_text_mail(winmail_dat: bytes, *, signed: bool = False) -> bytes:
    message = EmailMessage()
    message["From"] = "Anna Agent <anna@broker.example>"
    message["To"] = "paula@example.com"
    message["Subject"] = "Exposé"
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n")
    message.add_attachment(
        winmail_dat, maintype="application", subtype="ms-tnef", filename="winmail.dat"
    )
    message.add_attachment(b"BEGIN:VCARD\r\nEND:VCARD\r\n", "text", "vcard", filename="anna.vcf")
    if signed:
        message.replace_header(
            "Content-Type", message["Content-Type"].replace("multipart/mixed", "multipart/signed")
        )
    return message.as_bytes(policy=email.policy.SMTP)


def unpack(raw: bytes) -> winmail.Unpacked | None:
    return winmail.unpacked(raw, mime.parse(raw), "m1")


def files_of(raw: bytes) -> list[tuple[str | None, str, bytes]]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    return [
        (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))  # type: ignore[misc]
        for part in parsed.iter_attachments()
    ]


def test_the_files_stand_where_the_winmail_dat_stood() -> None:
    stream = w.stream(
        [
            Attachment(PDF, title="EXPOSE~1.PDF", long_filename=LONG_NAME),
            Attachment(b"", title="leer.txt"),
            Attachment(b"<x/>", title="liste.xml", mime_tag="multipart/mixed"),
        ]
    )
    raw = rich_text_mail(stream)
    result = unpack(raw)
    assert result is not None
    assert result.files == (LONG_NAME.strip(), "leer.txt", "liste.xml")
    assert files_of(result.raw) == [
        (LONG_NAME.strip(), "application/pdf", PDF),
        ("leer.txt", "text/plain", b""),
        ("liste.xml", "application/octet-stream", b"<x/>"),
        ("anna.vcf", "text/vcard", b"BEGIN:VCARD\r\nEND:VCARD\r\n"),
    ]
    [tnef_part] = [p for p in mime.parse(raw).walk() if p.content_type == "application/ms-tnef"]
    assert result.raw[: tnef_part.start] == raw[: tnef_part.start]
    assert result.raw.endswith(raw[tnef_part.end :])
    assert not headers.has_bare_line_end(result.raw)
    facts = mime.part_facts(result.raw, result.root)
    assert [(f.filename, f.is_attachment) for f in facts if f.is_attachment] == [
        (LONG_NAME.strip(), True),
        ("leer.txt", True),
        ("liste.xml", True),
        ("anna.vcf", True),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        rich_text_mail(w.stream([Attachment(PDF, title="a.pdf")]), signed=True),
        rich_text_mail(w.stream([Attachment(PDF, title="a.pdf")], message_class=w.MEETING_REQUEST)),
        rich_text_mail(w.stream([Attachment(PDF, title="a.pdf")])[:-900]),
        rich_text_mail(b"not TNEF at all"),
    ],
    ids=["signed", "meeting-request", "cut-short", "not-tnef"],
)
def test_a_message_is_left_alone_when_its_winmail_dat_must_stay(raw: bytes) -> None:
    assert unpack(raw) is None


def test_a_winmail_dat_that_is_the_whole_message_stays() -> None:
    """No multipart to stand its files in; Outlook never sends it so."""
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content(w.stream([Attachment(PDF, title="a.pdf")]), "application", "ms-tnef")
    assert unpack(message.as_bytes(policy=email.policy.SMTP)) is None


def test_a_winmail_dat_in_an_alternative_stays() -> None:
    """Its files would be read as other views of the body, not as attachments."""
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content("Guten Tag")
    message.add_alternative(
        w.stream([Attachment(PDF, title="a.pdf")]), "application", "ms-tnef", filename="winmail.dat"
    )
    assert mime.parse(raw := message.as_bytes()).content_type == "multipart/alternative"
    assert unpack(raw) is None


def test_more_files_than_a_message_may_have_parts_keep_it_whole() -> None:
    many = [Attachment(b"x", title=f"{n}.txt") for n in range(mime.Limits().max_parts + 1)]
    assert unpack(rich_text_mail(w.stream(many))) is None


def test_replace_parts_refuses_what_it_cannot_do() -> None:
    raw = rich_text_mail(w.stream([Attachment(PDF, title="a.pdf")]))
    root = mime.parse(raw)
    for pieces in ({"": [b"x"]}, {"2": []}, {"9": [b"x"]}):
        with pytest.raises(ValueError):
            mime.replace_parts(raw, root, pieces)
