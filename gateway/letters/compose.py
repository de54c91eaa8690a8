"""The registered letter as the prospect receives it: the agent's From, every block in full.

The letter's body is the durable medium: every consent block is in it in full, in text and
HTML, the same snapshot the page shows and the consent hashes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Any

import jinja2

from gateway.config import Settings
from gateway.letters.blocks import BlockSet, contracting_company, fill, markdown_html
from gateway.mail import headers, mime, own_mail
from gateway.mail.markdown_text import markdown_text
from gateway.texts.catalog import shipped_catalogs
from gateway.texts.files import TEMPLATES

_templates = TEMPLATES / "letter"
_text = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=False)  # noqa: S701
_html = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=True)


def remove_subject_tag(raw: bytes, tag: str) -> bytes:
    """The message with `tag` taken off the front of its Subject.

    Where the tag stands in the field as plain bytes, only those bytes go; an encoded
    subject is written anew (RFC 2047), the rest of the message untouched.
    """
    block = headers.header_block(raw)
    fields = headers.parse_fields(block)
    for field in fields:
        if field.name != "subject":
            continue
        name, _, value = field.raw.partition(b":")
        stripped = value.lstrip(b" \t")
        encoded_tag = tag.encode("utf-8")
        if stripped[: len(encoded_tag)].decode("utf-8", "replace").casefold() == tag.casefold():
            rest = stripped[len(encoded_tag) :].lstrip(b" \t")
            new = name + b": " + rest
        else:
            text = headers.decoded(field.value)
            if not text.casefold().startswith(tag.casefold()):
                return raw
            new = headers.format_field("Subject", own_mail.encoded_words(text[len(tag) :].strip()))
        start = block.index(field.raw)
        return b"".join((raw[:start], new, memoryview(raw)[start + len(field.raw) :]))
    return raw


def _greeted(block_set: BlockSet, recipient_name: str) -> str:
    """The intro after the set's greeting for a recipient with or without a name. A set
    written before the greeting keys carries it in its intro: there an unknown name goes with
    the space before it ("Guten Tag,"), the best such a set allows."""
    if not block_set.greeting:
        intro = block_set.intro
        return intro if recipient_name else intro.replace(" {recipient_name}", "")
    greeting = block_set.greeting if recipient_name else block_set.greeting_without_name
    return f"{greeting}\n\n{block_set.intro}"


@dataclass(frozen=True)
class LetterMail:
    recipient: str
    recipient_name: str
    agent_name: str
    subject: str
    language: str
    url: str
    days: int


def compose_letter(
    settings: Settings,
    block_set: BlockSet,
    mail: LetterMail,
    original_fields: list[headers.HeaderField],
    terms_pdf: bytes | None,
    now: datetime,
) -> bytes:
    """The letter as bytes: the agent's own From, our body with every block in full."""
    company = contracting_company(settings)
    values = {
        "recipient_name": mail.recipient_name,
        "agent_name": mail.agent_name,
        "company": company,
        "subject": mail.subject,
        "days": str(mail.days),
    }
    intro = fill(_greeted(block_set, mail.recipient_name), values)
    outro = fill(block_set.outro, values)
    context: dict[str, Any] = {
        "language": mail.language,
        "subject": mail.subject,
        "intro": markdown_text(intro),
        "intro_html": markdown_html(intro),
        "outro": markdown_text(outro),
        "outro_html": markdown_html(outro),
        "url": mail.url,
        "link_label": block_set.link_label,
        "color": settings.branding.primary_color,
        "agent_name": mail.agent_name,
        "company": company,
        "blocks": [
            {
                **asdict(block),
                "text": markdown_text(block.text),
                "html": markdown_html(block.text),
            }
            for block in block_set.blocks
        ],
    }
    subject = fill(block_set.letter_subject, values)
    head = [
        next(f.raw for f in original_fields if f.name == "from"),
        headers.format_field("To", own_mail.named_address(mail.recipient_name, mail.recipient)),
        headers.format_field("Subject", own_mail.encoded_words(subject)),
        headers.format_field("Date", format_datetime(now)),
        headers.format_field("Message-ID", own_mail.message_id(settings.server.hostname)),
        *(f.raw for f in original_fields if f.name in ("reply-to", "in-reply-to", "references")),
    ]
    catalog = shipped_catalogs(settings.branding.timezone)[mail.language]
    return own_mail.message(head, _letter_body(context, terms_pdf, catalog.t("letter.terms_file")))


def letter_for_held(
    settings: Settings,
    block_set: BlockSet,
    held_fields: list[headers.HeaderField],
    *,
    sender: str,
    recipient: str,
    subject: str,
    language: str,
    url: str,
    days: int,
    terms_pdf: bytes | None,
    now: datetime,
) -> bytes:
    """The letter for the held copy whose header fields are `held_fields`: names taken from
    its From, To and Cc (the agent's `sender` when its From names no one). The materializer
    sends the first one, `LetterDesk.resend` a fresh one with a new link."""
    agent_address = (headers.addresses(held_fields, "from") or [sender])[0]
    letter = compose_letter(
        settings,
        block_set,
        LetterMail(
            recipient=recipient,
            recipient_name=headers.display_name(held_fields, ("to", "cc"), recipient),
            agent_name=headers.display_name(held_fields, ("from",), agent_address) or agent_address,
            subject=subject,
            language=language,
            url=url,
            days=days,
        ),
        held_fields,
        terms_pdf,
        now,
    )
    mime.parse(letter)
    return letter


def _letter_body(
    context: dict[str, Any], terms_pdf: bytes | None, terms_file: str
) -> own_mail.Part:
    """The letter's text and HTML as alternatives, the terms (when configured) attached."""
    alternatives = [
        own_mail.text_part(_text.get_template("letter.txt.j2").render(context)),
        own_mail.text_part(_html.get_template("letter.html.j2").render(context), subtype="html"),
    ]
    body = own_mail.multipart("alternative", alternatives, label="letter")
    if terms_pdf is None:
        return body
    terms = own_mail.attachment(terms_pdf, "application/pdf", terms_file)
    return own_mail.multipart("mixed", [body, terms], label="letter")
