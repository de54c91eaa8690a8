"""Bounces (RFC 3464 DSNs): structure, the three parts, languages, and header safety."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from gateway.mail.headers import has_bare_line_end, split_message
from gateway.mail.own_mail import render
from gateway.outbound.dsn import FailedRecipient, dsn_mail

NOW = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
ARRIVAL = NOW - timedelta(days=5, minutes=3)
MTA = "relay.broker.example"
SENDER = "agent@broker.example"

PLAIN = (
    b"From: Anna Agent <agent@broker.example>\r\n"
    b"To: prospect@example.org, other@example.net\r\n"
    b"Subject: Expose Lindenstrasse 5\r\n"
    b"Date: Mon, 02 Nov 2026 09:00:00 +0100\r\n"
    b"Message-ID: <offer-1@broker.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Sehr geehrte Damen und Herren,\r\nanbei das Expose.\r\n"
)

# Folded fields, raw 8-bit UTF-8, and a subject whose encoded word decodes to CR LF followed
# by something that looks like a header field.
WEIRD = (
    b"Received: from agent-pc (agent-pc [192.0.2.7])\r\n"
    b"\tby relay.broker.example with ESMTPSA;\r\n"
    b"\tMon, 02 Nov 2026 09:00:01 +0100\r\n"
    b"From: =?utf-8?q?J=C3=BCrgen?= <agent@broker.example>\r\n"
    b"To: \xc3\x9crsula M\xc3\xbcller <prospect@example.org>\r\n"
    b"Subject: =?utf-8?q?a=0D=0AX-Injected:_1?=\r\n"
    b"X-Long: one two three four five six seven eight nine ten eleven twelve\r\n"
    b" thirteen fourteen\r\n"
    b"Date: Mon, 02 Nov 2026 09:00:00 +0100\r\n"
    b"Message-ID: <weird@broker.example>\r\n"
    b"\r\n"
    b"Body with --boundary-looking lines\r\n--=_sealrelay_dsn_\r\n"
)

USER_UNKNOWN = FailedRecipient(
    address="prospect@example.org",
    status="5.1.1",
    diagnostic="550 5.1.1 <prospect@example.org>: no such user",
    last_attempt=NOW - timedelta(minutes=1),
    remote_mta="mx.example.org",
)
EXPIRED = FailedRecipient(
    address="other@example.net",
    status="4.4.7",
    diagnostic="Could not deliver for 5 days: connection timed out",
    last_attempt=NOW,
    remote_mta=None,
)


def build(
    original: bytes = PLAIN,
    failed: tuple[FailedRecipient, ...] = (USER_UNKNOWN,),
    **kwargs: object,
) -> bytes:
    params: dict[str, object] = {
        "reporting_mta": MTA,
        "original": original,
        "envelope_sender": SENDER,
        "failed": failed,
        "arrival": ARRIVAL,
        "now": NOW,
    }
    params.update(kwargs)
    mail = dsn_mail(**params)  # type: ignore[arg-type]
    now = params["now"]
    assert isinstance(now, datetime)
    return render(mail, sender=f"MAILER-DAEMON@{MTA}", hostname=MTA, now=now.astimezone(UTC))


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts_of(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    parts = [part for part in payload if isinstance(part, EmailMessage)]
    assert len(parts) == len(payload)
    return parts


def text_of(raw: bytes) -> str:
    """The decoded human-readable part."""
    content = parts_of(parse(raw))[0].get_content()
    assert isinstance(content, str)
    return content


def recipient_blocks(msg: EmailMessage) -> tuple[Message, list[Message]]:
    status = parts_of(msg)[1]
    payload = status.get_payload()
    assert isinstance(payload, list)
    blocks = [block for block in payload if isinstance(block, Message)]
    assert len(blocks) == len(payload)
    return blocks[0], blocks[1:]


def unfolded(value: str | None) -> str:
    """A field value with its white space normalized: format_field folds with CRLF TAB."""
    assert value is not None
    return " ".join(value.split())


def top_header_block(raw: bytes) -> bytes:
    return split_message(raw)[0]


def part_bodies(raw: bytes) -> list[bytes]:
    """The raw bytes of each body part, split at the boundary ourselves."""
    boundary = parse(raw).get_boundary()
    assert boundary
    delimiter = b"\r\n--" + boundary.encode()
    _, _, rest = raw.partition(b"--" + boundary.encode() + b"\r\n")
    chunks = rest.split(delimiter)
    assert chunks[-1] == b"--\r\n"
    return [split_message(chunk.removeprefix(b"\r\n"))[1] for chunk in chunks[:-1]]


# -- structure -------------------------------------------------------------------------------


def test_multipart_report_with_three_parts_in_order() -> None:
    msg = parse(build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    types = [part.get_content_type() for part in parts_of(msg)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts_of(msg)[0].get_content_charset() == "utf-8"
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects


def test_envelope_facing_headers() -> None:
    raw = build()
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    assert re.fullmatch(rf"<[0-9a-f]{{32}}@{re.escape(MTA)}>", msg["Message-ID"])
    assert msg["In-Reply-To"] == "<offer-1@broker.example>"
    assert msg["References"] == "<offer-1@broker.example>"


def test_message_ids_and_boundaries_are_fresh() -> None:
    first, second = parse(build()), parse(build())
    assert first["Message-ID"] != second["Message-ID"]
    assert first.get_boundary() != second.get_boundary()


def test_crlf_everywhere_and_ascii_header() -> None:
    for original in (PLAIN, WEIRD):
        raw = build(original, (USER_UNKNOWN, EXPIRED))
        assert not has_bare_line_end(raw)
        assert raw.endswith(b"\r\n")
        assert top_header_block(raw).isascii()
        assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_lf_only_original_still_gives_crlf_only() -> None:
    lf_original = PLAIN.replace(b"\r\n", b"\n")
    raw = build(lf_original)
    assert not has_bare_line_end(raw)
    assert part_bodies(raw)[2] == top_header_block(PLAIN)


# -- the delivery-status part ----------------------------------------------------------------


def test_delivery_status_lists_exactly_the_failed_recipients() -> None:
    msg = parse(build(failed=(USER_UNKNOWN, EXPIRED), envelope_id="ENV-42"))
    per_message, per_recipient = recipient_blocks(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL

    assert [b["Final-Recipient"] for b in per_recipient] == [
        "rfc822; prospect@example.org",
        "rfc822; other@example.net",
    ]
    assert [b["Action"] for b in per_recipient] == ["failed", "failed"]
    assert [b["Status"] for b in per_recipient] == ["5.1.1", "4.4.7"]
    unknown, expired = per_recipient
    assert unknown["Diagnostic-Code"] == "smtp; 550 5.1.1 <prospect@example.org>: no such user"
    assert unknown["Remote-MTA"] == "dns; mx.example.org"
    assert parsedate_to_datetime(unknown["Last-Attempt-Date"]) == USER_UNKNOWN.last_attempt
    # Our own text is no SMTP reply: it gets a private diagnostic type.
    assert unfolded(expired["Diagnostic-Code"]) == (
        "X-Sealrelay; Could not deliver for 5 days: connection timed out"
    )
    assert "Remote-MTA" not in expired
    # Without an ORCPT parameter there is no Original-Recipient (RFC 3461 §6.3 d).
    assert all("Original-Recipient" not in b for b in per_recipient)


def test_original_recipient_only_from_orcpt() -> None:
    with_orcpt = FailedRecipient(
        address="prospect@example.org",
        status="5.1.1",
        diagnostic="550 5.1.1 no such user",
        last_attempt=NOW,
        remote_mta=None,
        original_recipient="rfc822;Prospect@Example.org",
    )
    _, blocks = recipient_blocks(parse(build(failed=(with_orcpt, EXPIRED))))
    assert blocks[0]["Original-Recipient"] == "rfc822; Prospect@Example.org"
    assert "Original-Recipient" not in blocks[1]


def test_no_envelope_id_no_field() -> None:
    per_message, _ = recipient_blocks(parse(build()))
    assert "Original-Envelope-Id" not in per_message


def test_diagnostic_with_line_breaks_does_not_inject_lines() -> None:
    evil = FailedRecipient(
        address="prospect@example.org",
        status="5.7.1",
        diagnostic="550 5.7.1 go away\r\nX-Injected: 1\rAction: delivered\nStatus: 2.0.0\x00",
        last_attempt=NOW,
        remote_mta="mx.example.org\r\nX-Injected: 2",
    )
    raw = build(failed=(evil,))
    assert not has_bare_line_end(raw)
    injected = re.compile(rb"(?mi)^(X-Injected|Status: 2|Action: delivered)")
    _, status_part, _ = part_bodies(raw)
    assert not injected.search(top_header_block(raw))
    assert not injected.search(status_part)
    # The text part is quoted-printable: judge its decoded lines, not its soft breaks.
    decoded_text = text_of(raw).encode()
    assert not injected.search(decoded_text)
    assert b"go away X-Injected: 1 Action: delivered Status: 2.0.0" in decoded_text
    _, (block,) = recipient_blocks(parse(raw))
    assert block["Status"] == "5.7.1"
    assert block["Action"] == "failed"
    assert unfolded(block["Diagnostic-Code"]) == (
        "smtp; 550 5.7.1 go away X-Injected: 1 Action: delivered Status: 2.0.0"
    )
    assert "X-Injected" not in block
    assert block["Remote-MTA"] == "dns; mx.example.orgX-Injected:2"
    status_part = part_bodies(raw)[1]
    assert status_part.isascii()


def test_long_diagnostic_is_folded_and_reads_back_whole() -> None:
    words = " ".join(f"word{i}" for i in range(60))
    long = FailedRecipient(
        address="prospect@example.org",
        status="5.0.0",
        diagnostic=f"554 5.0.0 {words}",
        last_attempt=NOW,
        remote_mta=None,
    )
    raw = build(failed=(long,))
    status_part = part_bodies(raw)[1]
    assert max(len(line) for line in status_part.split(b"\r\n")) <= 78
    _, (block,) = recipient_blocks(parse(raw))
    # format_field folds with CRLF TAB, so white space reads back as a tab here and there.
    assert unfolded(block["Diagnostic-Code"]) == f"smtp; 554 5.0.0 {words}"


def test_non_ascii_diagnostic_stays_ascii_in_the_status_part() -> None:
    utf8 = FailedRecipient(
        address="prospect@example.org",
        status="5.2.2",
        diagnostic="552 5.2.2 Postfach voll – bitte später",
        last_attempt=NOW,
        remote_mta=None,
    )
    raw = build(failed=(utf8,))
    assert part_bodies(raw)[1].isascii()
    text = text_of(raw)
    assert "Postfach voll – bitte später" in text


@pytest.mark.parametrize(
    ("language", "explained"),
    [
        ("de", "der Weg zum Empfänger kann solche Adressen nicht übermitteln"),
        ("en", "the way to the recipient cannot carry such addresses"),
        ("es", "el camino hasta el destinatario no puede transmitir esas direcciones"),
    ],
)
def test_an_address_that_needed_smtputf8_is_explained(language: str, explained: str) -> None:
    utf8 = FailedRecipient(
        address="jörg@bücher.example",
        status="5.6.7",
        diagnostic="550 5.6.7 smtp.example does not offer SMTPUTF8, which this recipient's"
        " address needs",
        last_attempt=NOW,
        remote_mta="smtp.example",
    )
    text = " ".join(text_of(build(failed=(utf8,), language=language)).split())
    assert explained in text and "SMTPUTF8" in text


def test_smtputf8_recipient_uses_utf8_address_type() -> None:
    intl = FailedRecipient(
        address="jürgen@example.org",
        status="5.1.1",
        diagnostic="550 5.1.1 unknown",
        last_attempt=NOW,
        remote_mta=None,
    )
    raw = build(failed=(intl,))
    assert part_bodies(raw)[1].isascii()
    _, (block,) = recipient_blocks(parse(raw))
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen@example.org"


# -- the text/rfc822-headers part ------------------------------------------------------------


@pytest.mark.parametrize("original", [PLAIN, WEIRD], ids=["plain", "weird"])
def test_rfc822_headers_part_is_the_original_block_byte_for_byte(original: bytes) -> None:
    raw = build(original)
    expected = split_message(original)[0]
    assert part_bodies(raw)[2] == expected
    headers_part = parts_of(parse(raw))[2]
    payload = headers_part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == expected.replace(b"\r\n", b"\n")
    assert expected in raw


def test_8bit_original_headers_are_declared_8bit() -> None:
    weird = parse(build(WEIRD))
    plain = parse(build(PLAIN))
    assert parts_of(weird)[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts_of(plain)[2]["Content-Transfer-Encoding"] == "7bit"


def test_encoded_crlf_in_original_subject_injects_nothing() -> None:
    raw = build(WEIRD)
    msg = parse(raw)
    assert "X-Injected" not in msg
    for part in msg.walk():
        assert "X-Injected" not in part
    assert not re.search(rb"(?mi)^X-Injected", raw)
    assert not re.search(rb"(?mi)^X-Injected", top_header_block(raw))
    # The subject is kept, as one line.
    assert msg["Subject"] == "Unzustellbar: a X-Injected: 1"


def test_body_is_not_embedded() -> None:
    raw = build(PLAIN)
    assert b"anbei das Expose" not in raw


# -- boundary --------------------------------------------------------------------------------


def test_boundary_does_not_occur_in_the_original() -> None:
    for original in (PLAIN, WEIRD):
        raw = build(original)
        boundary = parse(raw).get_boundary()
        assert boundary
        assert boundary.encode() not in original
        assert raw.count(b"--" + boundary.encode()) == 4  # three parts and the close


def test_boundary_is_redrawn_when_it_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: Iterator[str] = iter("abcdef")

    def fake_token_hex(nbytes: int) -> str:
        return next(draws) * (2 * nbytes)

    colliding = PLAIN.replace(
        b"Subject:", b"X-Trap: =_sealrelay_dsn_" + b"a" * 24 + b"\r\nSubject:"
    )
    monkeypatch.setattr("gateway.mail.own_mail.secrets.token_hex", fake_token_hex)
    raw = build(colliding)
    boundary = parse(raw).get_boundary()
    assert boundary == "=_sealrelay_dsn_" + "b" * 24
    assert part_bodies(raw)[2] == split_message(colliding)[0]


# -- the human-readable part and the subject -------------------------------------------------


@pytest.mark.parametrize(
    ("language", "subject", "phrase"),
    [
        ("de", "Unzustellbar: Expose Lindenstrasse 5", "nicht zugestellt werden"),
        ("en", "Undeliverable: Expose Lindenstrasse 5", "could not be reached"),
        ("es", "No entregado: Expose Lindenstrasse 5", "No se ha podido entregar"),
        ("de-AT", "Unzustellbar: Expose Lindenstrasse 5", "nicht zugestellt werden"),
        ("ES_es", "No entregado: Expose Lindenstrasse 5", "No se ha podido entregar"),
        ("fr", "Undeliverable: Expose Lindenstrasse 5", "could not be reached"),
        ("../../etc/passwd", "Undeliverable: Expose Lindenstrasse 5", "could not be reached"),
        ("", "Undeliverable: Expose Lindenstrasse 5", "could not be reached"),
    ],
)
def test_localized_subject_and_text(language: str, subject: str, phrase: str) -> None:
    msg = parse(build(language=language))
    assert msg["Subject"] == subject
    text_part = parts_of(msg)[0]
    text = text_part.get_content()
    assert phrase in text
    assert text_part["Content-Language"] == subject_language(subject)


def subject_language(subject: str) -> str:
    return {"Unzustellbar": "de", "Undeliverable": "en", "No entregado": "es"}[
        subject.split(":")[0]
    ]


def test_default_language_is_german() -> None:
    assert parse(build())["Subject"].startswith("Unzustellbar: ")


def test_text_lists_recipients_diagnostics_subject_and_date() -> None:
    msg = parse(build(failed=(USER_UNKNOWN, EXPIRED), language="en"))
    text = parts_of(msg)[0].get_content()
    assert "prospect@example.org" in text
    assert "550 5.1.1 <prospect@example.org>: no such user" in text
    assert "other@example.net" in text
    assert "Expose Lindenstrasse 5" in text
    assert "Mon, 02 Nov 2026 09:00:00 +0100" in text
    assert "We kept trying for 5 days" in text
    assert "does not exist" in text


@pytest.mark.parametrize(
    ("language", "phrase"),
    [("de", "5 Tage lang"), ("en", "We kept trying for 5 days"), ("es", "durante 5 días")],
)
def test_expired_text_says_how_long_we_tried(language: str, phrase: str) -> None:
    text = parts_of(parse(build(failed=(EXPIRED,), language=language)))[0].get_content()
    assert phrase in text


def test_short_queue_lifetime_is_told_in_hours() -> None:
    quick = FailedRecipient(
        address="other@example.net",
        status="4.4.7",
        diagnostic="gave up",
        last_attempt=NOW,
        remote_mta=None,
    )
    raw = build(failed=(quick,), arrival=NOW - timedelta(hours=4), language="en")
    assert "We kept trying for 4 hours" in text_of(raw)


def test_permanent_failure_does_not_speak_of_retrying() -> None:
    text = parts_of(parse(build(language="en")))[0].get_content()
    assert "kept trying" not in text


def test_non_ascii_subject_is_rfc2047_encoded() -> None:
    original = PLAIN.replace(
        b"Subject: Expose Lindenstrasse 5",
        b"Subject: =?utf-8?q?Expos=C3=A9_M=C3=BCllerstra=C3=9Fe_5,_3._OG_links,"
        b"_mit_Garten_und_Garage?=",
    )
    raw = build(original)
    head = top_header_block(raw)
    assert head.isascii()
    assert b"=?utf-8?" in head
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    expected = "Unzustellbar: Exposé Müllerstraße 5, 3. OG links, mit Garten und Garage"
    assert parse(raw)["Subject"] == expected
    assert expected.split(": ", 1)[1] in text_of(raw)


def test_raw_8bit_subject_is_encoded_too() -> None:
    original = PLAIN.replace(b"Expose Lindenstrasse", "Exposé Lindenstraße".encode())
    raw = build(original, language="en")
    assert top_header_block(raw).isascii()
    assert parse(raw)["Subject"] == "Undeliverable: Exposé Lindenstraße 5"


def test_missing_subject() -> None:
    original = PLAIN.replace(b"Subject: Expose Lindenstrasse 5\r\n", b"")
    assert parse(build(original, language="en"))["Subject"] == "Undeliverable: (no subject)"


def test_text_part_is_quoted_printable_with_short_lines() -> None:
    raw = build(failed=(USER_UNKNOWN, EXPIRED))
    text_part = part_bodies(raw)[0]
    assert text_part.isascii()
    assert max(len(line) for line in text_part.split(b"\r\n")) <= 76
    assert "Empfänger" in text_of(raw)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["", "<>", "agent@broker.example\r\nBcc: x@y", "a<b>@c"])
def test_refuses_null_or_broken_sender(sender: str) -> None:
    with pytest.raises(ValueError):
        build(envelope_sender=sender)


def test_refuses_naive_datetimes_and_bad_input() -> None:
    with pytest.raises(ValueError):
        build(now=datetime(2026, 11, 5, 10, 0))
    with pytest.raises(ValueError):
        build(failed=())
    with pytest.raises(ValueError):
        build(reporting_mta="relay.example\r\nX: y")
    for status in ("550", "2.0.0", "5.1", "5.1.1 "):
        bad = FailedRecipient(
            address="a@example.org",
            status=status,
            diagnostic="x",
            last_attempt=NOW,
            remote_mta=None,
        )
        with pytest.raises(ValueError):
            build(failed=(bad,))
