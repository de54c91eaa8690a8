"""Golden files: every mail the relay writes, byte for byte, in German, English and Spanish.

Each mail (bounce, registered letter, consent confirmation, renewal request, expiry notice)
is composed from fixed inputs by the same functions the relay uses (each kind's content, then
``own_mail.render`` as the one door for the relay's own mail does) and compared with
``tests/golden/<mail>-<language>.eml``. Only what is random or the moment of writing is
normalised before the comparison: boundaries (``BOUNDARY-1`` ...), the random part of the
Message-ID and the Date field. Every other byte (header order, folding, encodings, CRLF line
ends, the texts) must match, so a change to any mail shows up here as a readable diff.

To accept an intended change, regenerate the files and read the diff before committing:

    SEALRELAY_UPDATE_GOLDEN=1 pytest tests/mail/test_golden_mails.py
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.letters.blocks import BlockSet, BlockSets
from gateway.letters.compose import LetterMail, compose_letter
from gateway.letters.confirmation import confirmation_mail
from gateway.letters.evidence import ConsentRecord, texts_sha256
from gateway.letters.expiry_notice import ExpiredLetter, expiry_notice_mail
from gateway.letters.renewal import request_mail
from gateway.mail import headers
from gateway.mail.own_mail import OwnMail, render
from gateway.notices.mails import (
    FirstDownloads,
    WaitingLetter,
    expiry_warning_mail,
    first_download_mail,
)
from gateway.outbound.dsn import FailedRecipient, dsn_mail
from gateway.texts.catalog import shipped_catalogs
from tests.conftest import relay_settings

GOLDEN = Path(__file__).parents[1] / "golden"
UPDATE = os.environ.get("SEALRELAY_UPDATE_GOLDEN") == "1"
LANGUAGES = ("de", "en", "es")
HOSTNAME = "relay.broker.example"
AGENT = "anna.agent@broker.example"
PROSPECT = "paula.prospect@example.com"
ZONE = "Europe/Berlin"
NOW = datetime(2026, 11, 23, 14, 5, 9, tzinfo=UTC)
CONSENT_ID = "0190abcdef0123456789"
LETTER_ID = "0190fedcba9876543210"
MESSAGE_ID = "0190aa55bb66cc77dd88"
PUBLIC_URL = "https://relay.broker.example"
# a stand-in: the consent PDF and the terms have their own tests; here only their place counts
PDF = b"%PDF-1.7\n% stand-in for a PDF in the golden mails\n%%EOF\n"
OFFER_HEADER = (
    b"From: Anna Agent <anna.agent@broker.example>\r\n"
    b"To: Paula Prospect <paula.prospect@example.com>\r\n"
    b"Reply-To: Anna Agent <anna.agent@broker.example>\r\n"
    b"Subject: =?utf-8?q?=5BExpos=C3=A9=5D_Villa_am_See_=E2=80=93_4_Zimmer?=\r\n"
    b"Date: Mon, 23 Nov 2026 09:12:00 +0100\r\n"
    b"Message-ID: <offer-villa.4711@broker.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Guten Tag,\r\n\r\nanbei das Expos\xc3\xa9.\r\n"
)
OFFER_SUBJECT = "Villa am See – 4 Zimmer"

_BOUNDARY = re.compile(rb'boundary="([^"]+)"')
# the id of what the mail is about (a consent, a letter: 20 hex digits) stays, the rest goes
_MESSAGE_ID = re.compile(rb"(?m)^(Message-ID: <(?:[0-9a-f]{20}\.)?)[0-9A-Za-z._-]+(@)")
_DATE = re.compile(rb"(?m)^Date: [^\r\n]*")


def sent(mail: OwnMail, sender: str = "postmaster@broker.example") -> bytes:
    """The mail as the relay's one door writes it (gateway.outbound.local_mail.enqueue renders
    so)."""
    return render(mail, sender=sender, hostname=HOSTNAME, now=NOW)


def block_set(language: str) -> BlockSet:
    return BlockSets(relay_settings(Path("/nonexistent"), 25)).get("default", language)


def dsn(language: str) -> bytes:
    failed = [
        FailedRecipient(
            address=PROSPECT,
            status="5.1.1",
            diagnostic="550 5.1.1 <paula.prospect@example.com>: no such user",
            last_attempt=NOW,
            remote_mta="mx.example.com",
            original_recipient=f"rfc822;{PROSPECT}",
        ),
        FailedRecipient(
            address="lars.late@example.org",
            status="4.4.7",
            diagnostic="gave up after 5 days; last error: 451 4.3.0 try again later",
            last_attempt=NOW,
            remote_mta=None,
        ),
    ]
    mail = dsn_mail(
        reporting_mta=HOSTNAME,
        original=OFFER_HEADER,
        envelope_sender=AGENT,
        failed=failed,
        arrival=NOW - timedelta(days=5),
        now=NOW,
        envelope_id="0190aaaabbbbccccdddd",
        language=language,
        zone=ZONE,
    )
    return sent(mail, "MAILER-DAEMON@broker.example")


def letter(language: str) -> bytes:
    settings = relay_settings(Path("/nonexistent"), 25)
    mail = LetterMail(
        recipient=PROSPECT,
        recipient_name="Paula Prospect",
        agent_name="Anna Agent",
        subject="[Exposé] Villa am See – 4 Zimmer",
        language=language,
        url=f"{settings.server.public_url}/l/{'T' * 43}",
        days=14,
    )
    fields = headers.fields_of(OFFER_HEADER)
    return compose_letter(settings, block_set(language), mail, fields, PDF, NOW)


def confirmation(language: str) -> bytes:
    blocks = block_set(language).blocks
    boxes = [b.id for b in blocks if b.checkbox is not None]
    record = ConsentRecord(
        consent_id=CONSENT_ID,
        recipient=f"Paula Prospect <{PROSPECT}>",
        subject=f"[Exposé] {OFFER_SUBJECT}",
        agent=f"Anna Agent <{AGENT}>",
        company="Muster Immobilien GmbH",
        language=language,
        letter_sent_at=NOW - timedelta(days=2),
        given_at=NOW,
        ip="203.0.113.7",
        user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X)",
        blocks=blocks,
        checked=frozenset(boxes[:-1]),  # the last box left unticked
        texts_sha256=texts_sha256(blocks),
    )
    mail = confirmation_mail(
        record,
        PDF,
        agent_address=AGENT,
        offer_subject=OFFER_SUBJECT,
        language=language,
        zone=ZONE,
    )
    return sent(mail)


def renewal(language: str) -> bytes:
    mail = request_mail(
        shipped_catalogs(ZONE)[language],
        console=f"{PUBLIC_URL}/console/messages/{MESSAGE_ID}",
        agent=AGENT,
        recipient=PROSPECT,
        subject=f"[Exposé] {OFFER_SUBJECT}",
        expired_on=NOW - timedelta(hours=3),
    )
    return sent(mail)


def expiry_notice(language: str) -> bytes:
    mail = expiry_notice_mail(
        ExpiredLetter(
            letter_id=LETTER_ID,
            recipient=PROSPECT,
            offer_subject=f"[Exposé] {OFFER_SUBJECT}",
            letter_sent=NOW - timedelta(days=14),
            expired=NOW,
        ),
        agent_address=AGENT,
        console=f"{PUBLIC_URL}/console/messages/{MESSAGE_ID}",
        language=language,
        zone=ZONE,
    )
    return sent(mail)


def first_download(language: str) -> bytes:
    mail = first_download_mail(
        FirstDownloads(
            message_id=MESSAGE_ID,
            recipient=PROSPECT,
            offer_subject=OFFER_SUBJECT,
            filenames=("Grundriss EG.pdf", "Fotos Garten & Terrasse.zip"),
            at=NOW,
        ),
        agent_address=AGENT,
        public_url=PUBLIC_URL,
        language=language,
        zone=ZONE,
    )
    return sent(mail)


def expiry_warning(language: str) -> bytes:
    mail = expiry_warning_mail(
        WaitingLetter(
            letter_id=LETTER_ID,
            message_id=MESSAGE_ID,
            recipient=PROSPECT,
            offer_subject=f"[Exposé] {OFFER_SUBJECT}",
            letter_sent=NOW - timedelta(days=12),
            expires=NOW + timedelta(days=2),
        ),
        agent_address=AGENT,
        public_url=PUBLIC_URL,
        language=language,
        zone=ZONE,
    )
    return sent(mail)


MAILS: dict[str, Callable[[str], bytes]] = {
    "dsn": dsn,
    "letter": letter,
    "confirmation": confirmation,
    "renewal": renewal,
    "expiry-notice": expiry_notice,
    "first-download": first_download,
    "expiry-warning": expiry_warning,
}


def normalised(raw: bytes) -> bytes:
    """The mail with its random and time-of-writing values replaced by fixed names: the
    boundaries everywhere, Date and Message-ID in the top header block alone."""
    for number, boundary in enumerate(dict.fromkeys(_BOUNDARY.findall(raw)), start=1):
        raw = raw.replace(boundary, b"BOUNDARY-%d" % number)
    head, body = headers.split_message(raw)
    head = _DATE.sub(b"Date: DATE", _MESSAGE_ID.sub(rb"\1ID\2", head))
    return head + b"\r\n" + body


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("mail", MAILS)
def test_mail_matches_its_golden_file(mail: str, language: str) -> None:
    raw = MAILS[mail](language)
    assert not headers.has_bare_line_end(raw), "every line ends in CRLF"
    got = normalised(raw)
    path = GOLDEN / f"{mail}-{language}.eml"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(got)
    assert path.is_file(), f"{path} is missing: run with SEALRELAY_UPDATE_GOLDEN=1 to write it"
    want = path.read_bytes()
    if got != want:
        diff = difflib.unified_diff(
            want.decode("utf-8", "replace").splitlines(),
            got.decode("utf-8", "replace").splitlines(),
            str(path),
            "composed now",
            lineterm="",
        )
        pytest.fail("the mail differs from its golden file:\n" + "\n".join(diff))


def test_normalising_keeps_everything_but_ids_dates_and_boundaries() -> None:
    raw = (
        b"Date: Mon, 23 Nov 2026 15:05:09 +0100\r\n"
        b"Message-ID: <0190abcdef0123456789.9f8e7d6c5b4a3210@relay.example>\r\n"
        b'Content-Type: multipart/mixed; boundary="=_x_123"\r\n\r\n'
        b"--=_x_123\r\nDate: in the body stays\r\n--=_x_123--\r\n"
    )
    assert normalised(raw) == (
        b"Date: DATE\r\n"
        b"Message-ID: <0190abcdef0123456789.ID@relay.example>\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUNDARY-1"\r\n\r\n'
        b"--BOUNDARY-1\r\nDate: in the body stays\r\n--BOUNDARY-1--\r\n"
    )
