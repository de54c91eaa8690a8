"""MIME parsing as byte offsets, and surgery that leaves every untouched byte as it was."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import html
import os
import tracemalloc
from collections.abc import Iterator
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail import headers, mime
from gateway.mail.mime import Limits, MimePart, UnsafeMessage

TOP = (
    b"Received: from client.broker.example by relay; Mon, 2 Nov 2026 10:00:00 +0000\r\n"
    b"From: Anna Agent <anna@broker.example>\r\n"
    b"To: Paula Prospect <paula@example.org>,\r\n  Otto <otto@example.org>\r\n"
    b"Cc: =?utf-8?q?J=C3=BCrgen?= <juergen@example.org>\r\n"
    b"Subject: =?utf-8?q?a=0D=0AX-Injected:_1?=\r\n"
    b"Message-ID: <offer.4711@broker.example>\r\n"
    b"References: <first@example.org>\r\n\t<second@example.org>\r\n"
    b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
)
KEPT = ("to", "cc", "subject", "message-id", "references", "from", "date", "received")
TEXT_BLOCK = "Ihre Unterlagen:\nGrundriss – Exposé für Käufer: https://dl.example/t/AbC123\n"
HTML_BLOCK = '<p>Ihre Unterlagen: <a href="https://dl.example/t/AbC123">Exposé für Käufer</a></p>'
LATIN_BLOCK = "Grüße: https://dl.example/t/AbC123 (gültig 90 Tage)\n"


def smtp_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=email.policy.SMTP)


def with_top(message: EmailMessage) -> bytes:
    """The agent's top-level fields, written by hand, before the generated MIME fields."""
    return TOP + smtp_bytes(message)


def top_fields(raw: bytes) -> dict[str, bytes]:
    fields = headers.fields_of(raw)
    return {name: b"".join(f.raw for f in fields if f.name == name) for name in KEPT}


def assert_clean(raw: bytes) -> Message:
    """The result is what a standard parser reads without complaint."""
    assert not headers.has_bare_line_end(raw)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    assert headers.first_value(headers.fields_of(raw), "x-injected") is None
    return message


def leaves(root: MimePart) -> list[MimePart]:
    return [part for part in root.walk() if not part.children]


def by_id(root: MimePart) -> dict[str, MimePart]:
    return {part.id: part for part in root.walk()}


def slice_of(raw: bytes, part: MimePart) -> bytes:
    return raw[part.start : part.end]


def shape(part: MimePart, base: int) -> tuple[Any, ...]:
    return (
        part.content_type,
        dict(part.params),
        part.disposition,
        part.filename,
        part.transfer_encoding,
        part.content_id,
        part.start - base,
        part.body_start - base,
        part.end - base,
        tuple(shape(child, base) for child in part.children),
    )


def python_leaves(message: Message) -> Iterator[Message]:
    """Leaves as we define them: attached messages are not entered."""
    if message.get_content_maintype() == "multipart":
        for child in message.get_payload():
            assert isinstance(child, Message)
            yield from python_leaves(child)
    else:
        yield message


def rich_message() -> EmailMessage:
    message = EmailMessage()
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n")
    message.add_alternative(
        '<html><body><p>Guten Tag,</p><img src="cid:logo@broker"></body></html>', subtype="html"
    )
    html_part = message.get_payload()[1]
    html_part.add_related(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        "image",
        "png",
        cid="<logo@broker>",
        filename="logo.png",
        disposition="inline",
    )
    message.add_attachment(
        os.urandom(5000), maintype="application", subtype="pdf", filename="Exposé Musterstraße.pdf"
    )
    attached = EmailMessage()
    attached["Subject"] = "Vorherige Nachricht"
    attached.set_content("Weitergeleitet.\n")
    message.add_attachment(attached)
    message.add_attachment(
        "BEGIN:VCALENDAR\nEND:VCALENDAR\n", subtype="calendar", filename="termin.ics"
    )
    return message


# --- parse ---------------------------------------------------------------------------------


def test_parse_structure_ids_and_types() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    types = [(part.id, part.content_type) for part in root.walk()]
    assert types == [
        ("", "multipart/mixed"),
        ("1", "multipart/alternative"),
        ("1.1", "text/plain"),
        ("1.2", "multipart/related"),
        ("1.2.1", "text/html"),
        ("1.2.2", "image/png"),
        ("2", "application/pdf"),
        ("3", "message/rfc822"),
        ("4", "text/calendar"),
    ]
    parts = by_id(root)
    assert parts["2"].filename == "Exposé Musterstraße.pdf"
    assert parts["2"].disposition == "attachment"
    assert parts["2"].transfer_encoding == "base64"
    assert parts["1.2.2"].content_id == "<logo@broker>"
    assert parts["1.1"].params["charset"] == "utf-8"
    assert root.params["boundary"]
    assert parts["3"].children == ()


def test_each_part_slice_reparses_to_the_same_part() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    for part in root.walk():
        again = mime.parse(slice_of(raw, part))
        assert shape(again, 0) == shape(part, part.start)


def test_decoded_bodies_match_the_standard_parser() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    ours = leaves(root)
    theirs = list(python_leaves(message))
    assert [p.content_type for p in ours] == [p.get_content_type() for p in theirs]
    for part, python_part in zip(ours, theirs, strict=True):
        if part.content_type == "message/rfc822":
            assert mime.decoded_body(raw, part) == python_part.get_payload(0).as_bytes(
                policy=email.policy.SMTP
            )
            continue
        expected = python_part.get_payload(decode=True)
        assert mime.decoded_body(raw, part) == expected
        assert mime.decoded_size(raw, part) == len(expected)


def test_part_facts_classify_and_measure_leaves() -> None:
    message = rich_message()
    raw = with_top(message)
    facts = {fact.id: fact for fact in mime.part_facts(raw, mime.parse(raw))}
    assert {k: v.is_attachment for k, v in facts.items()} == {
        "1.1": False,
        "1.2.1": False,
        "1.2.2": False,
        "2": True,
        "3": True,
        "4": True,
    }
    pdf = next(message.iter_attachments())
    assert facts["2"].size == len(pdf.get_content())
    assert facts["2"].filename == "Exposé Musterstraße.pdf"
    assert facts["4"].content_type == "text/calendar"
    assert facts["1.2.2"].filename == "logo.png"


def test_a_picture_in_the_body_is_never_an_attachment_whatever_its_disposition() -> None:
    """Python's add_related (and some mailers) write "attachment" for a picture the HTML
    shows by cid:; linking it would leave a broken image in the body."""
    message = EmailMessage()
    message.set_content("Guten Tag\n")
    message.add_alternative('<p><img src="cid:photo@broker"></p>', subtype="html")
    message.get_payload()[1].add_related(
        b"\xff\xd8" + bytes(300), "image", "jpeg", cid="<photo@broker>", filename="foto.jpg"
    )
    message.get_payload()[1].add_related(b"\xff\xd8", "image", "jpeg", filename="no-cid.jpg")
    raw = with_top(message)
    root = mime.parse(raw)
    assert by_id(root)["2.2"].disposition == "attachment"
    facts = {fact.id: fact.is_attachment for fact in mime.part_facts(raw, root)}
    assert facts == {"1": False, "2.1": False, "2.2": False, "2.3": True}


ODD = (
    TOP + b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed;\r\n"
    b'\tboundary="odd\'()+_,-./:=? b"  (a comment)\r\n'
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--odd'()+_,-./:=? b   \r\n"
    b"Content-Type: text/plain;\r\n charset=us-ascii\r\n"
    b"\r\n"
    b"Hello\r\n"
    b"--not the boundary\r\n"
    b" --odd'()+_,-./:=? b (not at line start)\r\n"
    b"--odd'()+_,-./:=? b\r\n"
    b"Content-Type: application/pdf\r\n"
    b"Content-Disposition: attachment;\r\n filename*=UTF-8''Expos%C3%A9.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBE\r\n Ri0x LjQK\r\n"
    b"--odd'()+_,-./:=? b\r\n"
    b'Content-Type: application/octet-stream; name="=?utf-8?q?Grundri=C3=9F.dwg?="\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"caf=C3=A9 =\r\nsoft\r\n"
    b"--odd'()+_,-./:=? b\r\n"
    b'Content-Type: text/html; name="<script>.pdf"\r\n'
    b"\r\n"
    b"<script>alert(1)</script>\r\n"
    b"--odd'()+_,-./:=? b\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; filename*0*=iso-8859-1''Gr%FCne;\r\n"
    b' filename*1=" Wiese.pdf"\r\n'
    b"\r\n"
    b"x\r\n"
    b"--odd'()+_,-./:=? b--  \r\n"
    b"This is the epilogue.\r\n"
)


def test_hand_written_message_with_odd_syntax() -> None:
    root = mime.parse(ODD)
    parts = by_id(root)
    assert [p.id for p in root.children] == ["1", "2", "3", "4", "5"]
    assert mime.decoded_body(ODD, parts["1"]) == (
        b"Hello\r\n--not the boundary\r\n --odd'()+_,-./:=? b (not at line start)"
    )
    assert parts["2"].filename == "Exposé.pdf"
    assert mime.decoded_body(ODD, parts["2"]) == b"%PDF-1.4\n"
    assert parts["3"].filename == "Grundriß.dwg"
    assert mime.decoded_body(ODD, parts["3"]) == b"caf\xc3\xa9 soft"
    assert parts["4"].filename == "<script>.pdf"
    assert parts["5"].filename == "Grüne Wiese.pdf"
    facts = {f.id: f for f in mime.part_facts(ODD, root)}
    assert [f.is_attachment for f in facts.values()] == [False, True, True, True, True]
    assert ODD[root.body_start :].startswith(b"This is the preamble.\r\n--odd")
    message = email.message_from_bytes(ODD, policy=email.policy.default)
    assert len(message.get_payload()) == 5
    for part, python_part in zip(leaves(root), python_leaves(message), strict=True):
        assert mime.decoded_body(ODD, part) == python_part.get_payload(decode=True)


MISSING_CLOSE = (
    b"Content-Type: multipart/mixed; boundary=XX\r\n"
    b"\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"body\r\n"
    b"--XX\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; filename=a.bin\r\n"
    b"\r\n"
    b"data\r\n"
)


def test_missing_close_delimiter_ends_last_part_at_parent_end() -> None:
    root = mime.parse(MISSING_CLOSE)
    first, last = root.children
    assert slice_of(MISSING_CLOSE, first).endswith(b"\r\n\r\nbody")
    assert last.end == len(MISSING_CLOSE)
    assert mime.decoded_body(MISSING_CLOSE, last) == b"data\r\n"
    without_last = mime.remove_parts(MISSING_CLOSE, root, ["2"])
    assert without_last == MISSING_CLOSE[: first.end]
    without_first = mime.remove_parts(MISSING_CLOSE, root, ["1"])
    assert slice_of(without_first, mime.parse(without_first).children[0]) == slice_of(
        MISSING_CLOSE, last
    )


def test_digest_parts_default_to_attached_messages() -> None:
    raw = (
        b'Content-Type: multipart/digest; boundary="d"\r\n\r\n'
        b"--d\r\n\r\nSubject: one\r\n\r\nfirst\r\n"
        b"--d\r\nContent-Type: text/plain\r\n\r\nsecond\r\n"
        b"--d--\r\n"
    )
    root = mime.parse(raw)
    assert [p.content_type for p in root.children] == ["message/rfc822", "text/plain"]
    assert mime.decoded_body(raw, root.children[0]) == b"Subject: one\r\n\r\nfirst"


def test_a_part_header_read_before_is_read_alike_under_another_parent() -> None:
    """Part header blocks are kept once read (the same text part comes message after
    message): a kept reading still depends on the parent, and nobody can change it."""
    part = b"Content-Disposition: inline\r\n\r\nbody\r\n"
    digest = b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n' + part + b"--d--\r\n"
    mixed = b'Content-Type: multipart/mixed; boundary="d"\r\n\r\n--d\r\n' + part + b"--d--\r\n"
    for first, second in ((digest, mixed), (mixed, digest), (digest, digest)):
        types = [mime.parse(raw).children[0].content_type for raw in (first, second)]
        expected = {digest: "message/rfc822", mixed: "text/plain"}
        assert types == [expected[first], expected[second]]
    top = b'Content-Type: multipart/mixed; boundary="d"\r\n\r\n--d\r\n'
    attachment = b'Content-Type: application/pdf; name="a.pdf"\r\n\r\nx\r\n--d--\r\n'
    one, two = (mime.parse(top + attachment).children[0] for _ in range(2))
    assert one.params == two.params == {"name": "a.pdf"}
    with pytest.raises(TypeError):
        one.params["name"] = "b.pdf"  # type: ignore[index]
    assert mime.parse(top + attachment).children[0].filename == "a.pdf"


def test_part_without_blank_line_or_headers() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n"
        b"--b\r\n\r\nno headers\r\n"
        b"--b\r\n--b--\r\n"
    )
    one, two, three = mime.parse(raw).children
    assert (one.body_start, one.end) == (one.end, one.end)
    assert two.content_type == "text/plain" and mime.decoded_body(raw, two) == b"no headers"
    assert three.start == three.end


def test_is_signed_anywhere_but_inside_attached_messages() -> None:
    signed = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
        b' micalg=sha-256; boundary="s"\r\n\r\n'
        b"--s\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
        b"--s\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n\r\nAAAA\r\n"
        b"--s--\r\n"
    )
    assert mime.is_signed(mime.parse(signed))
    assert mime.is_signed(mime.parse(b"Content-Type: application/pkcs7-mime\r\n\r\nAAAA\r\n"))
    nested = (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n--m\r\n' + signed + b"\r\n--m--\r\n"
    )
    assert mime.is_signed(mime.parse(nested))
    forwarded = EmailMessage()
    forwarded.set_content("see attached")
    forwarded.add_attachment(email.message_from_bytes(signed, policy=email.policy.default))
    assert not mime.is_signed(mime.parse(smtp_bytes(forwarded)))
    assert not mime.is_signed(mime.parse(with_top(rich_message())))


# --- limits --------------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(levels)
    )
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(levels)))
    return opening + b"Content-Type: text/plain\r\n\r\ndeep" + closing + b"\r\n"


def test_deep_nesting_fails_without_recursion() -> None:
    """How fast: bench/mime.py (a wall-clock limit fails on a loaded machine)."""
    with pytest.raises(UnsafeMessage, match="deeper than 20 levels"):
        mime.parse(nested(10_000))
    assert mime.parse(nested(20))
    with pytest.raises(UnsafeMessage, match="deeper than 3 levels"):
        mime.parse(nested(4), Limits(max_depth=3))


def test_too_many_parts() -> None:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * 100_000 + b"--b--\r\n"
    with pytest.raises(UnsafeMessage, match="more than 500 MIME parts"):
        mime.parse(raw)
    few = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * 2_000 + b"--b--\r\n"
    assert len(mime.parse(few, Limits(max_parts=2_001)).children) == 2_000


def test_header_block_too_large() -> None:
    fields = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    with pytest.raises(UnsafeMessage, match="header block larger than 262144 bytes"):
        mime.parse(fields * 300 + b"\r\nbody")
    inner = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' + fields * 300
    with pytest.raises(UnsafeMessage, match="header block larger"):
        mime.parse(inner + b"\r\nbody\r\n--b--\r\n")
    assert mime.parse(fields * 200 + b"\r\nbody").body_start == len(fields) * 200 + 2


@pytest.mark.parametrize(
    ("raw", "sentence"),
    [
        (b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nx\r\n--x--\r\n", "no boundary"),
        (b'Content-Type: multipart/mixed; boundary=""\r\n\r\nx\r\n', "no boundary"),
        (b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno parts\r\n", "never uses"),
        (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--xy\r\n\r\n", "never uses"),
        (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x--\r\n", "contains no parts"),
    ],
)
def test_broken_multiparts_are_unsafe(raw: bytes, sentence: str) -> None:
    with pytest.raises(UnsafeMessage, match=sentence) as caught:
        mime.parse(raw)
    assert str(caught.value).endswith(".")


@pytest.mark.parametrize(
    "value",
    [
        "multipart/mixed; boundary=b; x=" + "(" * 5000,
        "multipart/mixed; boundary=b" + ";" * 60_000,
        "multipart/mixed; boundary=b; x=" + '"\\"' * 20_000,
        "multipart/mixed; boundary=b; name*0*=''a" + "; y" * 20_000,
        "multipart/mixed; boundary=b" + "".join(f"; n*{i}*=%41" for i in range(999)),
    ],
)
def test_hostile_content_type_values_parse(value: str) -> None:
    """How fast (linear, not quadratic): bench/mime.py."""
    raw = f"Content-Type: {value}\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n".encode()
    root = mime.parse(raw)
    assert root.params["boundary"] == "b"


def test_content_field_beyond_sanity_is_unsafe() -> None:
    raw = b"Content-Type: text/plain; name=" + b"a" * 70_000 + b"\r\n\r\nx"
    with pytest.raises(UnsafeMessage, match="content field longer"):
        mime.parse(raw)


# --- remove_parts --------------------------------------------------------------------------


def test_remove_parts_removes_exactly_the_named_parts() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    before = by_id(root)
    out = mime.remove_parts(raw, root, ["2", "3"])
    after = mime.parse(out)
    assert [p.content_type for p in after.children] == [
        "multipart/alternative",
        "application/pdf",
        "text/calendar",
    ][::2]
    assert len(out) < len(raw) - len(slice_of(raw, before["2"])) - len(slice_of(raw, before["3"]))
    assert slice_of(out, after.children[0]) == slice_of(raw, before["1"])
    assert slice_of(out, after.children[1]) == slice_of(raw, before["4"])
    for old, new in zip(leaves(before[""].children[0]), leaves(after.children[0]), strict=True):
        assert slice_of(out, new) == slice_of(raw, old)
    assert out[: after.body_start] == raw[: root.body_start]
    assert top_fields(out) == top_fields(raw)
    message = assert_clean(out)
    assert [a.get_content_type() for a in message.iter_attachments()] == ["text/calendar"]


def test_remove_a_nested_inline_part_and_a_part_with_its_child() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    out = mime.remove_parts(raw, root, ["1.2.2", "2"])
    assert [p.id for p in mime.parse(out).walk()] == [
        "",
        "1",
        "1.1",
        "1.2",
        "1.2.1",
        "2",
        "3",
    ]
    assert mime.remove_parts(raw, root, ["1.2", "1.2.1"]) == mime.remove_parts(raw, root, ["1.2"])
    assert_clean(out)


def test_removing_every_part_leaves_an_empty_text_part() -> None:
    message = EmailMessage()
    message.add_attachment(b"one", maintype="application", subtype="pdf", filename="a.pdf")
    message.add_attachment(b"two", maintype="application", subtype="pdf", filename="b.pdf")
    raw = with_top(message)
    root = mime.parse(raw)
    assert [f.is_attachment for f in mime.part_facts(raw, root)] == [True, True]
    out = mime.remove_parts(raw, root, ["1", "2"])
    after = mime.parse(out)
    (only,) = after.children
    assert (only.content_type, only.params["charset"]) == ("text/plain", "utf-8")
    assert mime.decoded_body(out, only) == b""
    assert out[: after.body_start] == raw[: root.body_start]
    assert out.endswith(raw[root.children[-1].end :])
    assert_clean(out)


def test_remove_the_root_of_a_single_part_attachment_message() -> None:
    raw = (
        TOP + b"MIME-Version: 1.0\r\n"
        b"Content-Type: application/pdf; name=plan.pdf\r\n"
        b"X-Mailer: Brokerage CRM\r\n"
        b"Content-Disposition: attachment; filename=plan.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + base64.encodebytes(os.urandom(3000)).replace(b"\n", b"\r\n")
    )
    root = mime.parse(raw)
    assert mime.part_facts(raw, root)[0].is_attachment
    out = mime.remove_parts(raw, root, [""])
    assert out == (
        TOP + b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"X-Mailer: Brokerage CRM\r\n"
        b"\r\n"
    )
    linked = mime.add_link_block(out, mime.parse(out), TEXT_BLOCK, HTML_BLOCK)
    message = assert_clean(linked)
    assert message.get_content() == TEXT_BLOCK.replace("\n", "\r\n")
    assert top_fields(linked) == top_fields(raw)


def test_remove_parts_rejects_unknown_ids_and_the_root_multipart() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    with pytest.raises(ValueError, match="'9'"):
        mime.remove_parts(raw, root, ["2", "9"])
    with pytest.raises(ValueError, match="root multipart"):
        mime.remove_parts(raw, root, [""])
    with pytest.raises(TypeError):
        mime.remove_parts(raw, root, "2")
    assert mime.remove_parts(raw, root, []) == raw


def test_remove_the_first_part_without_preamble() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: application/pdf\r\n\r\nPDF\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n"
        b"--b--\r\n"
    )
    out = mime.remove_parts(raw, mime.parse(raw), ["1"])
    assert out == (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n"
        b"--b--\r\n"
    )


# --- add_link_block ------------------------------------------------------------------------


def encode_body(text: str, charset: str, encoding: str) -> bytes:
    data = text.replace("\n", "\r\n").encode(charset)
    if encoding == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if encoding == "quoted-printable":
        return binascii.b2a_qp(data, istext=True)
    return data


def alternative(encoding: str, charset: str, text: str, page: str) -> bytes:
    return (
        TOP + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="mix"\r\n'
        b"\r\n"
        b"--mix\r\n"
        b'Content-Type: multipart/alternative; boundary="alt"\r\n'
        b"\r\n"
        b"--alt\r\n"
        b'Content-Type: text/plain; charset="%(cs)s"; format=flowed\r\n'
        b"Content-Transfer-Encoding: %(cte)s\r\n"
        b"Content-Language: de\r\n"
        b"\r\n%(text)s\r\n"
        b"--alt\r\n"
        b"Content-Type: text/html;\r\n charset=%(cs)s\r\n"
        b"Content-Transfer-Encoding: %(cte)s\r\n"
        b"\r\n%(page)s\r\n"
        b"--alt--\r\n"
        b"\r\n"
        b"--mix\r\n"
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename=plan.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\nJVBERi0xLjQK\r\n"
        b"--mix--\r\n"
    ) % {
        b"cs": charset.encode(),
        b"cte": encoding.encode(),
        b"text": encode_body(text, charset, encoding),
        b"page": encode_body(page, charset, encoding),
    }


def field_names_and_bytes(raw: bytes, part: MimePart) -> list[tuple[str, bytes]]:
    block, _ = headers.split_message(raw[part.start : part.body_start])
    return [(f.name, f.raw) for f in headers.parse_fields(block)]


def assert_only_content_fields_changed(
    before: bytes, old: MimePart, after: bytes, new: MimePart
) -> None:
    """Fields other than Content-Transfer-Encoding and the charset stay byte for byte."""
    old_fields = field_names_and_bytes(before, old)
    new_fields = field_names_and_bytes(after, new)
    assert [n for n, _ in old_fields] == [n for n, _ in new_fields]
    for (name, old_raw), (_, new_raw) in zip(old_fields, new_fields, strict=True):
        if name == "content-transfer-encoding":
            continue
        if name == "content-type":
            charset = old.params.get("charset", "").encode()
            assert new_raw in (old_raw, old_raw.replace(charset, b"utf-8"))
            continue
        assert new_raw == old_raw


ENCODINGS = ["7bit", "8bit", "quoted-printable", "base64"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("charset", ["iso-8859-1", "utf-8", "windows-1252", "us-ascii"])
@pytest.mark.parametrize("text_block", [TEXT_BLOCK, LATIN_BLOCK])
def test_link_block_lands_in_text_and_html_bodies(
    encoding: str, charset: str, text_block: str
) -> None:
    ascii_only = encoding == "7bit" or charset == "us-ascii"
    text = "Guten Tag,\nanbei das Angebot.\n" if ascii_only else "Grüße aus Köln,\nIhre Anna\n"
    page = f"<html><BODY><p>{text.strip().replace(chr(10), '<br>')}</p></Body></html>"
    raw = alternative(encoding, charset, text, page)
    root = mime.parse(raw)
    out = mime.add_link_block(raw, root, text_block, HTML_BLOCK)
    after = mime.parse(out)
    message = assert_clean(out)
    plain = message.get_body(("plain",))
    rich = message.get_body(("html",))
    assert plain is not None and rich is not None
    plain_text = plain.get_content()
    assert plain_text.startswith(text.replace("\n", "\r\n"))
    assert plain_text.endswith(text_block.replace("\n", "\r\n"))
    page_text = html.unescape(rich.get_content())
    assert page_text.startswith(html.unescape(page.split("</Body>")[0]))
    assert page_text.rstrip("\r\n").endswith(html.unescape(HTML_BLOCK) + "</Body></html>")
    assert out[: after.body_start] == raw[: root.body_start]
    assert top_fields(out) == top_fields(raw)
    old, new = by_id(root), by_id(after)
    assert slice_of(out, new["2"]) == slice_of(raw, old["2"])
    for pid in ("1.1", "1.2"):
        assert_only_content_fields_changed(raw, old[pid], out, new[pid])
    if encoding in ("quoted-printable", "base64", "8bit"):
        assert new["1.1"].transfer_encoding == encoding == new["1.2"].transfer_encoding
    if (
        encoding in ("7bit", "8bit")
        and old["1.2"].params["charset"] == new["1.2"].params["charset"]
    ):
        inserted_at = out.index(HTML_BLOCK[:20].encode())
        assert (
            out[new["1.2"].body_start : inserted_at]
            == raw[old["1.2"].body_start :][: inserted_at - new["1.2"].body_start]
        )


def test_ascii_text_body_becomes_utf8_only_in_its_charset() -> None:
    raw = alternative("7bit", "us-ascii", "Hello\n", "<p>Hello</p>")
    root = mime.parse(raw)
    out = mime.add_link_block(raw, root, TEXT_BLOCK, HTML_BLOCK)
    text_part = by_id(mime.parse(out))["1.1"]
    fields = dict(field_names_and_bytes(out, text_part))
    assert fields["content-type"] == b'Content-Type: text/plain; charset="utf-8"; format=flowed\r\n'
    assert fields["content-transfer-encoding"] == b"Content-Transfer-Encoding: quoted-printable\r\n"
    assert fields["content-language"] == b"Content-Language: de\r\n"
    html_part = by_id(mime.parse(out))["1.2"]
    assert html_part.params["charset"] == "us-ascii"
    assert b"Expos&#233; f&#252;r K&#228;ufer" in mime.decoded_body(out, html_part)


def test_block_in_8bit_text_is_spliced_without_touching_agent_bytes() -> None:
    raw = alternative("8bit", "utf-8", "Grüße\n", "<html><body>x</body></html>")
    root = mime.parse(raw)
    out = mime.add_link_block(raw, root, TEXT_BLOCK, HTML_BLOCK)
    text_part = root.children[0].children[0]
    added = ("\r\n" + TEXT_BLOCK.replace("\n", "\r\n")).encode()
    assert out == raw[: text_part.end] + added + raw[text_part.end :].replace(
        b"x</body>", b"x" + HTML_BLOCK.encode() + b"</body>"
    )


def test_mislabelled_or_unknown_charset_gets_a_transliterated_block() -> None:
    agent = alternative("8bit", "utf-8", "Grüße\n", "<p>Grüße</p>")
    raw = agent.replace(b'charset="utf-8"', b'charset="us-ascii"')
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    part = by_id(mime.parse(out))["1.1"]
    body = mime.decoded_body(out, part)
    assert body.startswith("Grüße\r\n".encode())
    assert body.endswith(b"Grundriss - Expose fuer Kaeufer: https://dl.example/t/AbC123\r\n")
    assert part.params["charset"] == "us-ascii"

    unknown = agent.replace(b"utf-8", b"x-brokerage")
    out = mime.add_link_block(unknown, mime.parse(unknown), TEXT_BLOCK, HTML_BLOCK)
    parts = by_id(mime.parse(out))
    assert mime.decoded_body(out, parts["1.1"]).startswith("Grüße\r\n".encode())
    assert b"Expose fuer Kaeufer" in mime.decoded_body(out, parts["1.1"])
    page = mime.decoded_body(out, parts["1.2"])
    assert page.startswith("<p>Grüße</p>".encode())
    assert b"Expos&#233; f&#252;r K&#228;ufer" in page
    assert not headers.has_bare_line_end(out)


@pytest.mark.parametrize(
    ("written", "text"),
    [
        ("Grüße, Exposé anbei\n".encode(), "Grüße, Exposé anbei\n"),
        (b"Gr\xfc\xdfe \x80 5\n", "Grüße € 5\n"),
    ],
)
def test_undeclared_8bit_text_is_read_as_utf8_else_windows_1252(written: bytes, text: str) -> None:
    """swaks and scripts send 8-bit text with no charset: the block is not transliterated
    ("fuer") but the body is declared UTF-8, the agent's text the same text."""
    raw = (
        TOP
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + written.replace(b"\n", b"\r\n")
    )
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    message = assert_clean(out)
    assert message["content-type"].params["charset"] == "utf-8"
    body = message.get_content()
    assert body == (text + "\n" + TEXT_BLOCK).replace("\n", "\r\n")
    assert "Exposé für Käufer" in body
    assert not headers.has_bare_line_end(out)


@pytest.mark.parametrize(
    ("written", "codec"),
    [
        ("Здравствуйте, Анна!\nПрилагаю экспозе.\n", "koi8-r"),
        ("Здравствуйте, Анна!\nПрилагаю экспозе.\n", "cp1251"),
        ("Καλημέρα σας,\nσας στέλνω την προσφορά.\n", "cp1253"),
    ],
)
def test_undeclared_8bit_text_that_is_not_western_keeps_its_bytes(written: str, codec: str) -> None:
    """Read as Windows-1252 and declared UTF-8, a Russian or Greek body would be garbage for
    good: its bytes stay as written, the receiver guesses as before, the block is ASCII."""
    body = written.replace("\n", "\r\n").encode(codec)
    raw = TOP + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + body
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    root = mime.parse(out)
    text_part = next(p for p in root.walk() if p.content_type == "text/plain")
    assert "charset" not in text_part.params
    kept = mime.decoded_body(out, text_part)
    assert kept.startswith(body)
    assert kept[len(body) :].isascii() and b"Expose fuer Kaeufer" in kept
    assert not headers.has_bare_line_end(out)


@pytest.mark.parametrize(
    "written",
    ["Grüße aus München,\nanbei das Exposé.\n", "Müßig\n", "À bientôt, señora Núñez\n"],
)
def test_western_text_in_windows_1252_is_read_so(written: str) -> None:
    raw = (
        TOP
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + written.replace("\n", "\r\n").encode("cp1252")
    )
    message = assert_clean(mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK))
    assert message["content-type"].params["charset"] == "utf-8"
    assert message.get_content().startswith(written.replace("\n", "\r\n"))


def test_utf16_body_is_left_as_written_and_the_block_gets_its_own_part() -> None:
    body = base64.encodebytes("Grüße\r\n".encode("utf-16")).replace(b"\n", b"\r\n")
    raw = (
        TOP + b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-16\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    )
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    message = assert_clean(out)
    block, original = message.iter_parts()
    assert block.get_content() == TEXT_BLOCK.replace("\n", "\r\n")
    assert original.get_content() == "Grüße\r\n"
    assert original["content-type"].params["charset"] == "utf-16"
    assert out.endswith(body + b"\r\n--" + mime.parse(out).params["boundary"].encode() + b"--\r\n")
    assert top_fields(out) == top_fields(raw)


def test_single_part_text_message_gets_fields_and_keeps_top_fields() -> None:
    raw = TOP + b"\r\nHallo,\r\nbis bald.\r\n"
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    assert out.startswith(
        TOP + b"MIME-Version: 1.0\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nHallo,\r\nbis bald.\r\n\r\n"
    )
    message = assert_clean(out)
    assert message.get_content().endswith(TEXT_BLOCK.replace("\n", "\r\n"))


def test_html_only_message_gets_only_the_html_block() -> None:
    message = EmailMessage()
    message.set_content("<html><body><p>Angebot</p></body></html>", subtype="html")
    raw = with_top(message)
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    parsed = assert_clean(out)
    content = parsed.get_content()
    assert content.rstrip() == f"<html><body><p>Angebot</p>{HTML_BLOCK}</body></html>"
    assert top_fields(out) == top_fields(raw)


def test_mixed_without_body_gets_a_new_first_text_part() -> None:
    message = EmailMessage()
    message.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="a.pdf")
    message.add_attachment(b"img", maintype="image", subtype="jpeg", filename="b.jpg")
    raw = with_top(message)
    root = mime.parse(raw)
    out = mime.add_link_block(raw, root, TEXT_BLOCK, HTML_BLOCK)
    after = mime.parse(out)
    first = after.children[0]
    assert (first.content_type, first.params["charset"], first.transfer_encoding) == (
        "text/plain",
        "utf-8",
        "quoted-printable",
    )
    assert mime.decoded_body(out, first).decode() == TEXT_BLOCK.replace("\n", "\r\n")
    for old, new in zip(root.children, after.children[1:], strict=True):
        assert slice_of(out, new) == slice_of(raw, old)
    assert out[: after.body_start] == raw[: root.body_start]
    assert_clean(out)


def test_single_part_attachment_message_is_wrapped() -> None:
    payload = os.urandom(4000)
    content_fields = (
        b'Content-Type: application/pdf;\r\n name="=?utf-8?q?Expos=C3=A9.pdf?="\r\n'
        b"Content-Disposition: attachment; filename*=UTF-8''Expos%C3%A9.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
    )
    body = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    received, rest = TOP.split(b"\r\n", 1)
    raw = (
        received
        + b"\r\n"
        + content_fields
        + rest
        + b"X-Mailer: CRM\r\nMIME-Version: 1.0\r\n\r\n"
        + body
    )
    root = mime.parse(raw)
    out = mime.add_link_block(raw, root, TEXT_BLOCK, HTML_BLOCK)
    after = mime.parse(out)
    assert top_fields(out) == top_fields(raw)
    others = [f.name for f in headers.fields_of(raw) if not f.name.startswith("content-")]
    assert [f.name for f in headers.fields_of(out)] == [others[0], "content-type", *others[1:]]
    assert after.content_type == "multipart/mixed"
    boundary = after.params["boundary"].encode()
    assert raw.find(boundary) < 0
    text_part, original = after.children
    assert mime.decoded_body(out, text_part).decode() == TEXT_BLOCK.replace("\n", "\r\n")
    assert out[original.start : original.body_start] == content_fields + b"\r\n"
    assert out[original.body_start : original.end] == body
    assert mime.decoded_body(out, original) == payload
    assert original.filename == "Exposé.pdf"
    message = assert_clean(out)
    attachment = next(message.iter_attachments())
    assert attachment.get_content() == payload


def test_wrapping_picks_a_boundary_absent_from_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = "a" * 32
    raw = (
        b"Subject: x\r\nContent-Type: application/octet-stream\r\n\r\n"
        + f"=_sealrelay_{taken}".encode()
        + b"\r\n"
    )
    tokens = iter([taken, "b" * 32])
    monkeypatch.setattr(mime.secrets, "token_hex", lambda _n: next(tokens))
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    assert mime.parse(out).params["boundary"] == "=_sealrelay_" + "b" * 32
    assert_clean(out)


def test_remove_then_link_keeps_top_fields_and_other_parts() -> None:
    raw = with_top(rich_message())
    root = mime.parse(raw)
    removed = mime.remove_parts(raw, root, ["2"])
    out = mime.add_link_block(removed, mime.parse(removed), TEXT_BLOCK, HTML_BLOCK)
    after = by_id(mime.parse(out))
    before = by_id(root)
    assert top_fields(out) == top_fields(raw)
    for old, new in (("1.2.2", "1.2.2"), ("3", "2"), ("4", "3")):
        assert slice_of(out, after[new]) == slice_of(raw, before[old])
    message = assert_clean(out)
    plain, rich = message.get_body(("plain",)), message.get_body(("html",))
    assert plain is not None and rich is not None
    assert plain.get_content().endswith(TEXT_BLOCK.replace("\n", "\r\n"))
    assert HTML_BLOCK + "</body>" in rich.get_content()
    assert [a.get_filename() for a in message.iter_attachments()] == [None, "termin.ics"]


def test_unknown_transfer_encoding_body_is_left_alone() -> None:
    raw = (
        b"Subject: x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n"
        b"\r\nbegin 644 a\r\nend\r\n"
    )
    out = mime.add_link_block(raw, mime.parse(raw), TEXT_BLOCK, HTML_BLOCK)
    root = mime.parse(out)
    assert root.content_type == "multipart/mixed"
    assert slice_of(out, root.children[1]).endswith(b"\r\n\r\nbegin 644 a\r\nend\r\n")


def test_qp_encoder_keeps_lone_carriage_returns_out_of_the_line_structure() -> None:
    data = "a\rb = c \r\n" + "ü" * 60 + "\r\nend"
    encoded = mime._encode_qp(data.encode())
    assert not headers.has_bare_line_end(encoded)
    assert binascii.a2b_qp(encoded) == data.encode()


# --- size and speed ------------------------------------------------------------------------


def big_message() -> tuple[bytes, bytes]:
    payload = os.urandom(18 * 1024 * 1024)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (
        TOP + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="----=_Part_1"\r\n'
        b"\r\n"
        b"------=_Part_1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n" + b"Sehr geehrte Damen und Herren,\r\n" * 30_000 + b"\r\n"
        b"------=_Part_1\r\n"
        b"Content-Type: application/zip; name=fotos.zip\r\n"
        b"Content-Disposition: attachment; filename=fotos.zip\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + encoded + b"\r\n"
        b"------=_Part_1--\r\n"
    )
    return raw, payload


def test_25_mb_message_parses_and_drops_its_attachment_in_little_memory() -> None:
    """How fast: bench/mime.py."""
    raw, payload = big_message()
    assert len(raw) > 25_000_000
    tracemalloc.start()
    try:
        root = mime.parse(raw)
        out = mime.remove_parts(raw, root, ["2"])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        kept = mime.remove_parts(raw, root, ["1"])
        _, peak_kept = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(raw) // 10
    assert peak_kept < len(raw) * 1.2
    assert kept[-len(payload) // 2 :] == raw[-len(payload) // 2 :]
    assert len(out) < 1_100_000
    facts = mime.part_facts(raw, root)
    assert facts[1].size == len(payload)


# --- property ------------------------------------------------------------------------------

attachment_types = st.sampled_from(
    [
        ("text", "csv"),
        ("text", "plain"),
        ("application", "pdf"),
        ("image", "jpeg"),
        ("text", "html"),
    ]
)
names = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N"), include_characters=" -_äöüß"),
    min_size=1,
    max_size=30,
)


@st.composite
def attachments(draw: st.DrawFn) -> list[tuple[str, str, str, bytes | str]]:
    result: list[tuple[str, str, str, bytes | str]] = []
    for _ in range(draw(st.integers(1, 6))):
        maintype, subtype = draw(attachment_types)
        name = draw(names).strip() or "file"
        if maintype == "text":
            content: bytes | str = draw(st.text(min_size=0, max_size=400)).replace("\r", "")
        else:
            content = draw(st.binary(min_size=0, max_size=3000))
        result.append((maintype, subtype, f"{name}.{subtype}", content))
    return result


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=attachments(), with_html=st.booleans(), data=st.data())
def test_removing_any_subset_of_attachments(
    files: list[tuple[str, str, str, bytes | str]], with_html: bool, data: st.DataObject
) -> None:
    message = EmailMessage()
    message.set_content("Anbei die Unterlagen.\n")
    if with_html:
        message.add_alternative("<p>Anbei die Unterlagen.</p>\n", subtype="html")
    for maintype, subtype, filename, content in files:
        if isinstance(content, str):
            message.add_attachment(content, subtype=subtype, filename=filename)
        else:
            message.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    raw = with_top(message)
    root = mime.parse(raw)
    found = [fact for fact in mime.part_facts(raw, root) if fact.is_attachment]
    assert len(found) == len(files)
    assert [f.filename for f in found] == [name for _, _, name, _ in files]
    originals = {f.id: mime.decoded_body(raw, by_id(root)[f.id]) for f in found}
    assert [f.size for f in found] == [len(originals[f.id]) for f in found]
    removed = data.draw(st.sets(st.sampled_from([f.id for f in found])))

    out = mime.remove_parts(raw, root, removed)
    after = mime.parse(out)
    remaining = [fact for fact in mime.part_facts(out, after) if fact.is_attachment]
    kept_ids = [f.id for f in found if f.id not in removed]
    assert [mime.decoded_body(out, by_id(after)[f.id]) for f in remaining] == [
        originals[pid] for pid in kept_ids
    ]
    assert [f.filename for f in remaining] == [f.filename for f in found if f.id not in removed]
    assert top_fields(out) == top_fields(raw)
    parsed = assert_clean(out)
    assert len(list(parsed.iter_attachments())) == len(kept_ids)

    linked = mime.add_link_block(out, after, TEXT_BLOCK, HTML_BLOCK)
    final = assert_clean(linked)
    plain = final.get_body(("plain",))
    assert plain is not None and plain.get_content().endswith(TEXT_BLOCK.replace("\n", "\r\n"))
    if with_html:
        rich = final.get_body(("html",))
        assert rich is not None and HTML_BLOCK in rich.get_content()
    assert top_fields(linked) == top_fields(raw)
    relinked = mime.parse(linked)
    assert [
        mime.decoded_body(linked, by_id(relinked)[f.id])
        for f in mime.part_facts(linked, relinked)
        if f.is_attachment
    ] == [originals[pid] for pid in kept_ids]


MUTATION_TOKENS = [
    b"\r\n",
    b"\n",
    b"--",
    b"\r\n\r\n",
    b";",
    b'"',
    b"(",
    b"=?",
    b"--x\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"charset=utf-16",
    b"\x00",
    b"\xff",
]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.sampled_from([ODD, MISSING_CLOSE, alternative("base64", "utf-8", "Grüße\n", "<p/>")]),
    edits=st.lists(
        st.tuples(
            st.floats(0, 1), st.sampled_from(["delete", "insert"]), st.sampled_from(MUTATION_TOKENS)
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_damaged_messages_are_unsafe_or_handled(
    seed: bytes, edits: list[tuple[float, str, bytes]]
) -> None:
    raw = seed
    for where, operation, token in edits:
        at = int(where * len(raw))
        raw = raw[:at] + raw[at + 7 :] if operation == "delete" else raw[:at] + token + raw[at:]
    try:
        root = mime.parse(raw)
    except UnsafeMessage:
        return
    attachments = [f.id for f in mime.part_facts(raw, root) if f.is_attachment and f.id]
    out = mime.remove_parts(raw, root, attachments)
    linked = mime.add_link_block(out, mime.parse(out), TEXT_BLOCK, HTML_BLOCK)
    mime.parse(linked)
    if not headers.has_bare_line_end(raw):
        assert not headers.has_bare_line_end(linked)


def test_lf_only_message_is_understood() -> None:
    raw = with_top(rich_message()).replace(b"\r\n", b"\n")
    root = mime.parse(raw)
    assert [p.content_type for p in root.children] == [
        "multipart/alternative",
        "application/pdf",
        "message/rfc822",
        "text/calendar",
    ]
    out = mime.remove_parts(raw, root, ["2"])
    message = email.message_from_bytes(out, policy=email.policy.default)
    assert [a.get_content_type() for a in message.iter_attachments()] == [
        "message/rfc822",
        "text/calendar",
    ]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 56, 57, 58, 1000, 65537])
def test_base64_size_is_counted_without_decoding(size: int) -> None:
    message = EmailMessage()
    message["From"] = "a@broker.example"
    message.set_content("body")
    message.add_attachment(
        os.urandom(size), maintype="application", subtype="pdf", filename="x.pdf"
    )
    raw = message.as_bytes(policy=email.policy.SMTP)
    root = mime.parse(raw)
    [attachment] = [p for p in root.walk() if p.filename == "x.pdf"]
    assert mime.decoded_size(raw, attachment) == len(mime.decoded_body(raw, attachment)) == size


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_a_header_block_of_exactly_the_limit_is_read(ending: bytes) -> None:
    field = b"X-Filler: " + b"y" * 88 + ending  # 100 bytes with CRLF
    limit = Limits(max_header_bytes=len(field))
    body = ending + b"body" + ending
    assert mime.parse(field + body, limit).body_start == len(field) + len(ending)
    with pytest.raises(UnsafeMessage, match="header block larger"):
        mime.parse(b"X" + field + body, limit)
    with pytest.raises(UnsafeMessage, match="header block larger"):
        mime.parse(field * 2, limit)  # no blank line: all header, too much of it
    assert mime.parse(field, limit).body_start == len(field)
