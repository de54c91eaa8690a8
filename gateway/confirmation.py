"""The agent's confirmation: a prospect consented, the original went out, the PDF attached.

Our own message, concatenated as CRLF bytes like the DSN (gateway/dsn.py): every header
value goes through ``format_field``, a non-ASCII subject becomes RFC 2047 encoded words, the
text is UTF-8 quoted-printable and the consent PDF a base64 attachment. The wording is the
broker's, in ``gateway/texts/confirmation/{de,en,es}.toml``; the agent reads German unless
told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import unicodedata
from datetime import datetime
from email.header import Header
from email.utils import format_datetime

from gateway.consent_texts import moment
from gateway.evidence import ConsentRecord
from gateway.headers import format_field
from gateway.i18n import DEFAULT_TIMEZONE
from gateway.mime import join_multipart
from gateway.models import utcnow
from gateway.text_files import load_texts
from rules.language import HOME_LANGUAGE, shipped_language

CRLF = b"\r\n"
SUBJECT_PART_LIMIT = 150
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_ATTACHMENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def compose_confirmation(
    record: ConsentRecord,
    pdf: bytes,
    *,
    agent_address: str,
    hostname: str,
    offer_subject: str,
    language: str = HOME_LANGUAGE,
    now: datetime | None = None,
    sender: str | None = None,
    zone: str = DEFAULT_TIMEZONE,
) -> bytes:
    """The complete confirmation mail to ``agent_address`` (CRLF line ends).

    ``pdf`` is the consent PDF (gateway.consent_pdf.render of the same record); ``hostname``
    our host name, for From and Message-ID; ``offer_subject`` the offer's subject as the
    agent wrote it, decoded; ``language`` the agent's (``de`` by default); ``now`` the Date;
    ``zone`` the one the times are written in (``[branding] timezone``).
    Raises ``ValueError`` for values that are ours to get right: a bad host name or an agent
    address that could break a header line. ``sender`` is the From address
    (gateway.local_mail.own_sender), ``postmaster@hostname`` by default.
    """
    if not _HOSTNAME.fullmatch(hostname):
        raise ValueError(f"not a host name: {hostname!r}")
    if not agent_address or _one_line(agent_address, 320) != agent_address:
        raise ValueError(f"agent address is not usable in a header: {agent_address!r}")
    lang = shipped_language(language)
    texts = load_texts("confirmation")[lang]
    sent = now if now is not None else utcnow()

    recipient = _one_line(record.recipient, SUBJECT_PART_LIMIT)
    offer = _one_line(offer_subject, SUBJECT_PART_LIMIT)
    attachment = texts["attachment"].format(consent_id=record.consent_id)
    if not _ATTACHMENT_NAME.fullmatch(attachment):
        raise ValueError(f"attachment name {attachment!r} must be plain ASCII without spaces")
    declarations = [
        texts["ticked" if block.id in record.checked else "not_ticked"].format(
            label=_one_line(block.checkbox, 1000)
        )
        for block in record.blocks
        if block.checkbox is not None
    ]
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        given=moment(texts, record.given_at, lang, zone),
        letter_sent=moment(texts, record.letter_sent_at, lang, zone),
        ip=record.ip,
        user_agent=_one_line(record.user_agent, 1000),
        declarations="\n".join(declarations) or texts["no_checkboxes"],
        consent_id=record.consent_id,
        texts_sha256=record.texts_sha256,
        company=_one_line(record.company, 200),
        attachment=attachment,
    )
    subject = _one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400)

    text_part = _quoted_printable(body.strip("\n") + "\n")
    pdf_part = _base64_lines(pdf)
    boundary = _boundary(text_part, pdf_part)
    head = [
        format_field("From", f"sealrelay <{sender or f'postmaster@{hostname}'}>"),
        format_field("To", agent_address),
        format_field("Subject", _encoded_subject(subject)),
        format_field("Date", format_datetime(sent)),
        format_field("Message-ID", f"<{record.consent_id}.{secrets.token_hex(8)}@{hostname}>"),
        format_field("Auto-Submitted", "auto-generated"),
        format_field("MIME-Version", "1.0"),
        format_field("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
    ]
    parts = [
        (
            [
                format_field("Content-Type", "text/plain; charset=utf-8"),
                format_field("Content-Transfer-Encoding", "quoted-printable"),
                format_field("Content-Language", lang),
            ],
            text_part,
        ),
        (
            [
                format_field("Content-Type", f'application/pdf; name="{attachment}"'),
                format_field("Content-Transfer-Encoding", "base64"),
                format_field("Content-Disposition", f'attachment; filename="{attachment}"'),
            ],
            pdf_part,
        ),
    ]
    return join_multipart(head, boundary, parts)


def _one_line(text: str, limit: int) -> str:
    """Text that cannot start a new line: controls and line separators become spaces, bidi
    overrides go, white space is collapsed, and it is cut to ``limit`` characters."""
    cleaned = []
    for char in text:
        if char in _BIDI_CONTROLS:
            continue
        category = unicodedata.category(char)
        cleaned.append(" " if category in ("Cc", "Zl", "Zp") or char.isspace() else char)
    single = " ".join("".join(cleaned).split())
    return single if len(single) <= limit else single[: limit - 1].rstrip() + "…"


def _encoded_subject(subject: str) -> str:
    """All ASCII: RFC 2047 encoded words where needed, space-separated so format_field can fold
    between them (white space between encoded words is dropped when they are decoded)."""
    if subject.isascii() and "=?" not in subject:
        return subject
    encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\n")
    return " ".join(encoded.split())


def _quoted_printable(text: str) -> bytes:
    """UTF-8 text as quoted-printable with CRLF line ends: safe over 7-bit upstreams."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    encoded = [binascii.b2a_qp(line.encode("utf-8"), istext=False) for line in lines]
    return b"".join(_LINE_END.sub(CRLF, line) + CRLF for line in encoded)


def _base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 76 characters, each ending in CRLF (RFC 2045 §6.8)."""
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + 76] + CRLF for i in range(0, len(encoded), 76))


def _boundary(*contents: bytes) -> str:
    """A random boundary that occurs in none of the parts."""
    haystack = b"".join(contents).lower()
    while True:
        boundary = f"=_sealrelay_consent_{secrets.token_hex(12)}"
        if boundary.lower().encode("ascii") not in haystack:
            return boundary
