"""The agent's confirmation: a prospect consented, the original went out, the PDF attached.

Our own message (gateway/mail/own_mail.py builds its MIME, gateway/outbound/local_mail.py
queues it): the text and the consent PDF as an attachment. The wording is the broker's, in
``gateway/texts/catalogs/confirmation/{de,en,es}.toml``; the agent reads German unless told
otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.letters.consent_texts import moment
from gateway.letters.evidence import ConsentRecord
from gateway.mail.own_mail import (
    ADDRESS_LIMIT,
    OwnMail,
    attachment,
    multipart,
    one_line,
    text_part,
)
from gateway.texts.catalog import DEFAULT_TIMEZONE
from gateway.texts.files import load_texts
from rules.language import HOME_LANGUAGE, shipped_language

SUBJECT_PART_LIMIT = 150


def confirmation_mail(
    record: ConsentRecord,
    pdf: bytes,
    *,
    agent_address: str,
    offer_subject: str,
    language: str = HOME_LANGUAGE,
    zone: str = DEFAULT_TIMEZONE,
) -> OwnMail:
    """The confirmation to ``agent_address``.

    ``pdf`` is the consent PDF (gateway.letters.consent_pdf.render of the same record);
    ``offer_subject`` the offer's subject as the agent wrote it, decoded; ``language`` the
    agent's (``de`` by default); ``zone`` the one the times are written in (``[branding]
    timezone``). Raises ``ValueError`` for an agent address that could break a header line.
    """
    if not agent_address or one_line(agent_address, ADDRESS_LIMIT) != agent_address:
        raise ValueError(f"agent address is not usable in a header: {agent_address!r}")
    lang = shipped_language(language)
    texts = load_texts("confirmation")[lang]
    recipient = one_line(record.recipient, SUBJECT_PART_LIMIT)
    offer = one_line(offer_subject, SUBJECT_PART_LIMIT)
    filename = texts["attachment"].format(consent_id=record.consent_id)
    body = texts["body"].format(
        recipient=recipient,
        offer_subject=offer,
        given=moment(texts, record.given_at, lang, zone),
        letter_sent=moment(texts, record.letter_sent_at, lang, zone),
        ip=record.ip,
        user_agent=one_line(record.user_agent, 1000),
        declarations=_declarations(record, texts) or texts["no_checkboxes"],
        consent_id=record.consent_id,
        texts_sha256=record.texts_sha256,
        company=one_line(record.company, 200),
        attachment=filename,
    )
    parts = [
        text_part(body.strip("\n") + "\n", language=lang),
        attachment(pdf, "application/pdf", filename),
    ]
    return OwnMail(
        to=agent_address,
        subject=one_line(texts["subject"].format(offer_subject=offer, recipient=recipient), 400),
        body=multipart("mixed", parts, label="consent"),
        about=record.consent_id,
    )


def _declarations(record: ConsentRecord, texts: Mapping[str, str]) -> str:
    """One line per checkbox the prospect saw, ticked or not."""
    return "\n".join(
        texts["ticked" if block.id in record.checked else "not_ticked"].format(
            label=one_line(block.checkbox, 1000)
        )
        for block in record.blocks
        if block.checkbox is not None
    )
