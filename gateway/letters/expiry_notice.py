"""The agent's notice that a registered letter ran out without the prospect's consent.

Our own message (gateway/mail/own_mail.py builds its MIME, gateway/outbound/local_mail.py
queues it): one text part. The wording is the broker's, in
``gateway/texts/catalogs/letter_expired/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.letters.consent_texts import moment
from gateway.mail.own_mail import OwnMail, one_line, text_part
from gateway.texts.files import load_texts
from rules.language import shipped_language

SUBJECT_PART_LIMIT = 150


@dataclass(frozen=True)
class ExpiredLetter:
    letter_id: str
    recipient: str
    offer_subject: str
    letter_sent: datetime
    expired: datetime


def expiry_notice_mail(
    expired: ExpiredLetter, *, agent_address: str, console: str, language: str, zone: str
) -> OwnMail:
    """The notice to ``agent_address``, its times in ``zone`` (``[branding] timezone``);
    ``console`` is the message's console page, where the letter is sent again in one step."""
    lang = shipped_language(language)
    texts = load_texts("letter_expired")[lang]
    recipient = one_line(expired.recipient, SUBJECT_PART_LIMIT)
    offer = one_line(expired.offer_subject, SUBJECT_PART_LIMIT)
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        letter_sent=moment(texts, expired.letter_sent, lang, zone),
        expired=moment(texts, expired.expired, lang, zone),
        console_url=console,
        letter_id=expired.letter_id,
    )
    return OwnMail(
        to=agent_address,
        subject=one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400),
        body=text_part(body.strip("\n") + "\n", language=lang),
        about=expired.letter_id,
    )
