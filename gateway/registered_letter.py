"""Registered letters: hold the offer and send the consent texts (the release on consent is
the letter desk's, gateway/letter_desk.py).

The letter's body is the durable medium: every consent block is in it in full, in text and
HTML. The page the link opens shows the very same snapshot (stored with the letter), and
the consent hashes it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any

import jinja2
from markdown_it import MarkdownIt
from markupsafe import Markup

from gateway import headers, letter_keys, mime, own_mail
from gateway.blobstore import BlobStore
from gateway.config import Settings
from gateway.events import (
    DELIVERY_QUEUED,
    LETTER_HELD,
)
from gateway.evidence import ShownBlock, texts_sha256
from gateway.links import new_link, new_token
from gateway.markdown_text import markdown_text
from gateway.models import (
    Letter,
    LetterStatus,
    LinkKind,
    new_id,
)
from gateway.queue import new_delivery
from gateway.text_files import SHIPPED_BLOCK_SET, TEMPLATES, TextsError, read_toml
from rules.actions import LinkAttachments, RegisteredLetter
from rules.language import SHIPPED_LANGUAGES

log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# a placeholder, its closing emphasis, and the period of the sentence it ends
_PERIOD_AFTER = re.compile(r"(\{([a-z_]+)\}[*_]*)\.")
_markdown = MarkdownIt("commonmark", {"html": False})
_templates = TEMPLATES / "letter"
_text = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=False)  # noqa: S701
_html = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=True)


# Values from the settings, and where a broker sets each one.
SETTING_OF_VALUE = {
    "company": "[branding] company_name",
    "company_address": "[letter] company_address",
    "company_email": "[letter] company_email",
    "company_phone": "[letter] company_phone",
    "commission": "[letter] commission",
}
# Values of each letter, filled when it is sent; only these places may hold them.
PER_LETTER = ("subject", "recipient_name", "agent_name", "days")
PER_LETTER_PLACES = ("letter_subject", "greeting", "intro", "outro")


class UnfilledPlaceholders(ValueError):
    """Text holds placeholders without a value: it must never reach a reader."""

    def __init__(self, names: list[str]) -> None:
        super().__init__("no value for " + ", ".join(f"{{{name}}}" for name in names))
        self.names = names


def fill(text: str, values: Mapping[str, str]) -> str:
    """Placeholders like {company} replaced by their values; broker comments (<!-- -->) go.

    A placeholder without a value raises UnfilledPlaceholders rather than reaching a
    prospect as written. Values are inserted once, never read for placeholders again. A value
    that ends a sentence itself ("inkl. MwSt.") takes the place of the text's period after it.
    """
    text = _COMMENT.sub("", text)
    missing = sorted({match[1] for match in _PLACEHOLDER.finditer(text)} - values.keys())
    if missing:
        raise UnfilledPlaceholders(missing)
    text = _PERIOD_AFTER.sub(lambda m: m[1] if values[m[2]].endswith(".") else m[0], text)
    return _PLACEHOLDER.sub(lambda match: values[match[1]], text).strip()


def markdown_html(text: str) -> Markup:
    """HTML of the broker's Markdown, safe to place in a page or mail as it is: raw HTML is
    off, so every `<` of the source arrives escaped once, and only once."""
    return Markup(_markdown.render(text))  # noqa: S704


@dataclass(frozen=True)
class BlockSet:
    button: str
    letter_subject: str
    greeting: str  # the letter's first line, naming {recipient_name}
    greeting_without_name: str  # when the offer's To or Cc gives no name
    intro: str
    link_label: str
    outro: str
    blocks: tuple[ShownBlock, ...]


class BlockSetError(ValueError):
    """Block sets that cannot be used as configured; the message names every problem."""


class BlockSets:
    """Every block set a letter can use, in every language, loaded and checked at start-up:
    a text whose placeholder has no value stops start-up, so no letter ever shows one."""

    def __init__(self, settings: Settings) -> None:
        letter = settings.letter
        values = {
            "company": settings.branding.company_name,
            "company_address": letter.company_address,
            "company_email": letter.company_email,
            "company_phone": letter.company_phone,
            "commission": letter.commission,
        }
        directories = {"default": SHIPPED_BLOCK_SET, **letter.block_sets}
        problems: list[str] = []
        self.sets: dict[tuple[str, str], BlockSet] = {}
        for name in sorted(used_block_sets(settings)):
            for language in SHIPPED_LANGUAGES:
                texts = _Texts({key: value for key, value in values.items() if value})
                self.sets[(name, language)] = _load(directories[name] / language, texts)
                problems += [
                    f'letter block set "{name}", language {language}: {problem}'
                    for problem in texts.problems
                ]
        if problems:
            raise BlockSetError(
                "letter texts hold placeholders that would reach prospects as written:\n  "
                + "\n  ".join(problems)
            )

    def get(self, name: str, language: str) -> BlockSet:
        return self.sets[(name, language)]


def used_block_sets(settings: Settings) -> set[str]:
    """The block sets the policy, a group or a rule can choose for a letter."""
    chosen = [
        settings.policy.letter_block_set,
        *(group.letter_block_set for group in settings.groups),
        *(rule.set.letter_block_set for rule in settings.rules),
    ]
    return {name for name in chosen if name is not None}


class _Texts:
    """Fills one block set's texts and notes where each placeholder without a value is."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.unfilled: dict[str, list[str]] = {}

    def fill(self, place: str, text: str) -> str:
        values = dict(self.values)
        if place in PER_LETTER_PLACES:  # kept for the letter: filled when it is sent
            values.update({name: f"{{{name}}}" for name in PER_LETTER})
        try:
            return fill(text, values)
        except UnfilledPlaceholders as exc:
            for name in exc.names:
                self.unfilled.setdefault(name, []).append(place)
            return text

    @property
    def problems(self) -> list[str]:
        return [_unfilled(name, places) for name, places in sorted(self.unfilled.items())]


def _unfilled(name: str, places: list[str]) -> str:
    where = f"{{{name}}} in {', '.join(places)}"
    if name in SETTING_OF_VALUE:
        return f"{where} has no value: set {SETTING_OF_VALUE[name]}"
    if name in PER_LETTER:
        return f"{where}: {{{name}}} is filled only in {', '.join(PER_LETTER_PLACES)}"
    known = ", ".join(f"{{{known}}}" for known in (*SETTING_OF_VALUE, *PER_LETTER))
    return f"{where}: not a placeholder (known: {known})"


def _load(directory: Path, texts: _Texts) -> BlockSet:
    try:
        data = read_toml(directory / "blocks.toml")
        blocks = tuple(
            ShownBlock(
                id=block["id"],
                title=texts.fill(f"block {block['id']} title", block["title"]),
                text=texts.fill(
                    block["file"], (directory / block["file"]).read_text(encoding="utf-8")
                ),
                checkbox=(
                    texts.fill(f"block {block['id']} checkbox", block["checkbox"])
                    if "checkbox" in block
                    else None
                ),
            )
            for block in data["block"]
        )
        return BlockSet(
            button=texts.fill("button", data["button"]),
            letter_subject=texts.fill("letter_subject", data["letter_subject"]),
            greeting=texts.fill("greeting", data.get("greeting", "")),
            greeting_without_name=texts.fill(
                "greeting_without_name", data.get("greeting_without_name", "")
            ),
            intro=texts.fill("intro", data["intro"]),
            link_label=texts.fill("link_label", data["link_label"]),
            outro=texts.fill("outro", data["outro"]),
            blocks=blocks,
        )
    except (OSError, KeyError, TextsError) as exc:
        raise ValueError(f"letter block set {directory}: {exc}") from exc


def remove_subject_tag(raw: bytes, tag: str) -> bytes:
    """The message with `tag` taken off the front of its Subject.

    Where the tag stands in the field as plain bytes, only those bytes go; an encoded
    subject is written anew (RFC 2047), the rest of the message untouched.
    """
    block, _ = headers.split_message(raw)
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
            new = headers.format_field(
                "Subject", own_mail.encoded_subject(text[len(tag) :].strip())
            )
        start = block.index(field.raw)
        return raw[:start] + new + raw[start + len(field.raw) :]
    return raw


def _display_name(fields: list[headers.HeaderField], names: tuple[str, ...], address: str) -> str:
    pairs = getaddresses([value for name in names for value in headers.values(fields, name)])
    for display, addr in pairs:
        if addr.lower() == address.lower():
            return headers.decoded(display).strip()
    return ""


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
    values = {
        "recipient_name": mail.recipient_name,
        "agent_name": mail.agent_name,
        "company": settings.branding.company_name,
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
        "company": settings.branding.company_name,
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
        headers.format_field("To", f"<{mail.recipient}>"),
        headers.format_field("Subject", own_mail.encoded_subject(subject)),
        headers.format_field("Date", format_datetime(now)),
        headers.format_field("Message-ID", own_mail.message_id(settings.server.hostname)),
        *(f.raw for f in original_fields if f.name in ("reply-to", "in-reply-to", "references")),
    ]
    return own_mail.message(head, _letter_body(context, terms_pdf, mail.language))


def _letter_body(context: dict[str, Any], terms_pdf: bytes | None, language: str) -> own_mail.Part:
    """The letter's text and HTML as alternatives, the terms (when configured) attached."""
    alternatives = [
        own_mail.text_part(_text.get_template("letter.txt.j2").render(context)),
        own_mail.text_part(_html.get_template("letter.html.j2").render(context), subtype="html"),
    ]
    body = own_mail.multipart("alternative", alternatives, label="letter")
    if terms_pdf is None:
        return body
    filename = "AGB.pdf" if language == "de" else "terms.pdf"
    terms = own_mail.attachment(terms_pdf, "application/pdf", filename)
    return own_mail.multipart("mixed", [body, terms], label="letter")


class RegisteredLetterMaterializer:
    """Holds the original for one recipient and returns the letter that goes out now."""

    def __init__(self, settings: Settings, blobs: BlobStore, links: Any) -> None:
        self.settings = settings
        self.blobs = blobs
        self.links = links
        self.block_sets = BlockSets(settings)
        self.terms: dict[str, bytes] = {
            language: path.read_bytes() for language, path in settings.letter.terms_pdf.items()
        }

    async def __call__(self, draft: Any, recipient: str, action: RegisteredLetter) -> str:
        letter_keys.require_key(self.settings, draft.raw)
        held = remove_subject_tag(draft.raw, action.tag) if action.tag else draft.raw
        if action.link_parts:
            plan = LinkAttachments(action.link_parts, action.download_days, action.language)
            held = await self.links.copy_with_links(draft, held, recipient, plan)
        fields = headers.fields_of(held)
        subject = headers.decoded(headers.first_value(fields, "subject") or "")
        block_set = self.block_sets.get(action.block_set, action.language)
        token = new_token()
        link, _ = new_link(
            token=token,
            kind=LinkKind.LETTER,
            message_id=draft.message.id,
            recipient=recipient,
            language=action.language,
            now=draft.now,
            days=action.link_days,
        )
        agent_address = (headers.addresses(fields, "from") or [draft.message.sender])[0]
        letter_bytes = compose_letter(
            self.settings,
            block_set,
            LetterMail(
                recipient=recipient,
                recipient_name=_display_name(fields, ("to", "cc"), recipient),
                agent_name=_display_name(fields, ("from",), agent_address) or agent_address,
                subject=subject,
                language=action.language,
                url=f"{self.settings.server.public_url}/l/{token}",
                days=action.link_days,
            ),
            fields,
            self.terms.get(action.language),
            draft.now,
        )
        mime.parse(letter_bytes)
        letter = Letter(
            id=new_id(),
            message_id=draft.message.id,
            recipient=recipient,
            link_id=link.id,
            letter_blob=await self.blobs.put(letter_bytes),
            status=LetterStatus.HELD,
            language=action.language,
            subject=subject[:998],
            blocks=[asdict(block) for block in block_set.blocks],
            button=block_set.button,
            texts_sha256=texts_sha256(block_set.blocks),
            held_blob=await self.blobs.put(held),
            created_at=draft.now,
        )
        draft.rows.extend([link, letter])
        self._archive_copy(draft, letter.letter_blob)
        draft.events.append(
            LETTER_HELD.new(
                {
                    "recipient": recipient,
                    "letter_id": letter.id,
                    "expires_at": link.expires_at.isoformat(),
                    "texts_sha256": letter.texts_sha256,
                },
                message_id=draft.message.id,
            )
        )
        return letter.letter_blob

    def _archive_copy(self, draft: Any, letter_blob: str) -> None:
        """The archive gets the letter exactly as the prospect does (the same bytes)."""
        archive = self.settings.letter.archive_bcc
        if not archive:
            return
        delivery = new_delivery(
            draft.message.id, archive, letter_blob, draft.now, self.settings.upstream.queue_lifetime
        )
        draft.rows.append(delivery)
        draft.events.append(
            DELIVERY_QUEUED.new(
                {"recipient": archive}, message_id=draft.message.id, delivery_id=delivery.id
            )
        )
