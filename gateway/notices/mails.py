"""The wording of the agent's optional notices, as the relay's own mail (one text part).

The texts are the broker's, in ``gateway/texts/catalogs/{first_download,expiry_warning}/``;
times are written in ``[branding] timezone`` next to UTC, as the other notices write them.
Every value that came from someone else (a recipient address, a subject, a file name) goes
through ``one_line``, so none can start a header or a line of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gateway.letters.consent_texts import moment
from gateway.mail.own_mail import (
    ADDRESS_LIMIT,
    OwnMail,
    account_url,
    console_url,
    one_line,
    text_part,
)
from gateway.texts.files import load_texts
from rules.language import shipped_language

SUBJECT_PART_LIMIT = 150
FILENAME_LIMIT = 200


@dataclass(frozen=True)
class FirstDownloads:
    """One recipient's first downloads of files of one message, close together in time."""

    message_id: str
    recipient: str
    offer_subject: str
    filenames: tuple[str, ...]
    at: datetime  # the first of them


@dataclass(frozen=True)
class WaitingLetter:
    letter_id: str
    message_id: str
    recipient: str
    offer_subject: str
    letter_sent: datetime
    expires: datetime


def _addressee(agent_address: str) -> str:
    if not agent_address or one_line(agent_address, ADDRESS_LIMIT) != agent_address:
        raise ValueError(f"agent address is not usable in a header: {agent_address!r}")
    return agent_address


def first_download_mail(
    downloads: FirstDownloads,
    *,
    agent_address: str,
    public_url: str,
    language: str,
    zone: str,
) -> OwnMail:
    """The notice to ``agent_address`` that ``downloads.recipient`` has the files now."""
    lang = shipped_language(language)
    texts = load_texts("first_download")[lang]
    recipient = one_line(downloads.recipient, SUBJECT_PART_LIMIT)
    offer = one_line(downloads.offer_subject, SUBJECT_PART_LIMIT)
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        files=_file_lines(texts["file"], downloads.filenames),
        when=moment(texts, downloads.at, lang, zone),
        console_url=console_url(public_url, downloads.message_id),
        account_url=account_url(public_url),
    )
    return OwnMail(
        to=_addressee(agent_address),
        subject=one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400),
        body=text_part(body.strip("\n") + "\n", language=lang),
        about=downloads.message_id,
    )


def expiry_warning_mail(
    letter: WaitingLetter, *, agent_address: str, public_url: str, language: str, zone: str
) -> OwnMail:
    """The warning to ``agent_address`` that ``letter``'s link runs out at ``letter.expires``."""
    lang = shipped_language(language)
    texts = load_texts("expiry_warning")[lang]
    recipient = one_line(letter.recipient, SUBJECT_PART_LIMIT)
    offer = one_line(letter.offer_subject, SUBJECT_PART_LIMIT)
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        letter_sent=moment(texts, letter.letter_sent, lang, zone),
        expires=moment(texts, letter.expires, lang, zone),
        console_url=console_url(public_url, letter.message_id),
        letter_id=letter.letter_id,
        account_url=account_url(public_url),
    )
    return OwnMail(
        to=_addressee(agent_address),
        subject=one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400),
        body=text_part(body.strip("\n") + "\n", language=lang),
        about=letter.letter_id,
    )


def _file_lines(template: str, filenames: Sequence[str]) -> str:
    return "\n".join(template.format(filename=one_line(n, FILENAME_LIMIT)) for n in filenames)
