"""The agent's notice that a registered letter ran out without the prospect's consent.

Our own message, built like the consent confirmation (gateway/confirmation.py): every header
value through ``format_field``, the subject RFC 2047 encoded where needed, the text UTF-8
quoted-printable. The wording is the broker's, in ``gateway/texts/letter_expired/``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from gateway.confirmation import SUBJECT_PART_LIMIT, _encoded_subject, _one_line, _quoted_printable
from gateway.consent_texts import moment
from gateway.headers import format_field
from gateway.text_files import load_texts
from rules.language import shipped_language


@dataclass(frozen=True)
class ExpiredLetter:
    letter_id: str
    recipient: str
    offer_subject: str
    letter_sent: datetime
    expired: datetime


def compose_expiry_notice(
    expired: ExpiredLetter,
    *,
    agent_address: str,
    hostname: str,
    sender: str,
    language: str,
    zone: str,
    now: datetime,
) -> bytes:
    """The complete notice to ``agent_address`` (CRLF line ends), from ``sender``
    (gateway.local_mail.own_sender, so it is signed where the agent's domain has a key), its
    times in ``zone`` (``[branding] timezone``)."""
    lang = shipped_language(language)
    texts = load_texts("letter_expired")[lang]
    recipient = _one_line(expired.recipient, SUBJECT_PART_LIMIT)
    offer = _one_line(expired.offer_subject, SUBJECT_PART_LIMIT)
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        letter_sent=moment(texts, expired.letter_sent, lang, zone),
        expired=moment(texts, expired.expired, lang, zone),
        letter_id=expired.letter_id,
    )
    subject = _one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400)
    head = [
        format_field("From", f"sealrelay <{_one_line(sender, 320)}>"),
        format_field("To", _one_line(agent_address, 320)),
        format_field("Subject", _encoded_subject(subject)),
        format_field("Date", format_datetime(now)),
        format_field("Message-ID", f"<{expired.letter_id}.{secrets.token_hex(8)}@{hostname}>"),
        format_field("Auto-Submitted", "auto-generated"),
        format_field("X-Auto-Response-Suppress", "All"),
        format_field("MIME-Version", "1.0"),
        format_field("Content-Type", "text/plain; charset=utf-8"),
        format_field("Content-Transfer-Encoding", "quoted-printable"),
        format_field("Content-Language", lang),
    ]
    return b"".join(head) + b"\r\n" + _quoted_printable(body.strip("\n") + "\n")
