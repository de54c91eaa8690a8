"""Registered letters: hold the offer, send the consent texts, release on consent.

The letter's body is the durable medium: every consent block is in it in full, in text and
HTML. The page the link opens shows the very same snapshot (stored with the letter), and
the consent hashes it. Release happens in one transaction: consent record, journal, the
evidence-stamped original and the agent's confirmation queued together, exactly once.
"""

from __future__ import annotations

import email.policy
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from pathlib import Path
from typing import Any

import jinja2
from markdown_it import MarkdownIt
from sqlalchemy import select

from gateway import confirmation, headers, journal, mime
from gateway.blobstore import BlobStore
from gateway.config import Settings
from gateway.db import Database
from gateway.evidence import ConsentRecord, ShownBlock, evidence_fields, texts_sha256
from gateway.links import hash_token, new_link, new_token
from gateway.local_mail import compose_queued
from gateway.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    MessageKind,
    new_id,
)
from gateway.queue import new_delivery
from rules.actions import LinkAttachments, RegisteredLetter

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "letters" / "default"
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_ESCAPED = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_markdown = MarkdownIt("commonmark", {"html": False})
_templates = Path(__file__).parent / "templates" / "letter"
_text = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=False)  # noqa: S701
_html = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates), autoescape=True)


def fill(text: str, values: Mapping[str, str]) -> str:
    """Placeholders like {company}; unknown or unset ones stay as written, so a broker sees
    what is missing rather than a silent gap. Broker comments (<!-- -->) go."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1]) or m[0], _COMMENT.sub("", text)).strip()


def markdown_html(text: str) -> str:
    html: str = _markdown.render(text)
    return html


@dataclass(frozen=True)
class BlockSet:
    button: str
    letter_subject: str
    intro: str
    link_label: str
    outro: str
    blocks: tuple[ShownBlock, ...]


class BlockSets:
    """Every configured block set in every language, loaded and checked at start-up."""

    def __init__(self, settings: Settings) -> None:
        letter = settings.letter
        values = {
            "company": settings.branding.company_name,
            "company_address": letter.company_address,
            "company_email": letter.company_email,
            "company_phone": letter.company_phone,
            "commission": letter.commission,
        }
        directories = {"default": SHIPPED, **letter.block_sets}
        self.sets = {
            (name, language): _load(directory / language, values)
            for name, directory in directories.items()
            for language in ("de", "en", "es")
        }

    def get(self, name: str, language: str) -> BlockSet:
        return self.sets[(name, language)]


def _load(directory: Path, values: Mapping[str, str]) -> BlockSet:
    try:
        data = tomllib.loads((directory / "blocks.toml").read_text(encoding="utf-8"))
        blocks = tuple(
            ShownBlock(
                id=block["id"],
                title=fill(block["title"], values),
                text=fill((directory / block["file"]).read_text(encoding="utf-8"), values),
                checkbox=fill(block["checkbox"], values) if "checkbox" in block else None,
            )
            for block in data["block"]
        )
        return BlockSet(
            button=fill(data["button"], values),
            letter_subject=data["letter_subject"],
            intro=fill(data["intro"], values),
            link_label=fill(data["link_label"], values),
            outro=fill(data["outro"], values),
            blocks=blocks,
        )
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
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
            new = headers.format_field("Subject", _encoded(text[len(tag) :].strip()))
        start = block.index(field.raw)
        return raw[:start] + new + raw[start + len(field.raw) :]
    return raw


def _encoded(text: str) -> str:
    """RFC 2047 words on one line: Header.encode folds long text with a bare newline, which
    format_field refuses; it folds the words again itself."""
    return text if text.isascii() else " ".join(Header(text, "utf-8").encode().split())


def _display_name(fields: list[headers.HeaderField], names: tuple[str, ...], address: str) -> str:
    pairs = getaddresses([value for name in names for value in headers.values(fields, name)])
    for display, addr in pairs:
        if addr.lower() == address.lower():
            return headers.decoded(display).strip()
    return ""


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
    intro_text = block_set.intro
    if not mail.recipient_name:  # "Guten Tag," rather than "Guten Tag ,"
        intro_text = intro_text.replace(" {recipient_name}", "")
    intro, outro = fill(intro_text, values), fill(block_set.outro, values)
    context: dict[str, Any] = {
        "language": mail.language,
        "subject": mail.subject,
        "intro": intro,
        "intro_html": markdown_html(intro),
        "outro": outro,
        "outro_html": markdown_html(outro),
        "url": mail.url,
        "link_label": block_set.link_label,
        "color": settings.branding.primary_color,
        "agent_name": mail.agent_name,
        "company": settings.branding.company_name,
        "blocks": [
            {
                **asdict(block),
                "text": _ESCAPED.sub(r"\1", block.text),
                "html": markdown_html(block.text),
            }
            for block in block_set.blocks
        ],
    }
    body = EmailMessage()
    body.set_content(_text.get_template("letter.txt.j2").render(context), cte="quoted-printable")
    body.add_alternative(
        _html.get_template("letter.html.j2").render(context),
        subtype="html",
        cte="quoted-printable",
    )
    if terms_pdf is not None:
        body.add_attachment(
            terms_pdf,
            maintype="application",
            subtype="pdf",
            filename="AGB.pdf" if mail.language == "de" else "terms.pdf",
        )
    subject = fill(block_set.letter_subject, values)
    top = [
        next(f.raw for f in original_fields if f.name == "from"),
        headers.format_field("To", f"<{mail.recipient}>"),
        headers.format_field("Subject", _encoded(subject)),
        headers.format_field("Date", format_datetime(now)),
        headers.format_field("Message-ID", make_msgid(domain=settings.server.hostname)),
        *(f.raw for f in original_fields if f.name in ("reply-to", "in-reply-to", "references")),
    ]
    return b"".join(top) + body.as_bytes(policy=email.policy.SMTP)


class LetterError(Exception):
    """Why a letter cannot be opened or released; the web turns it into a page."""


class LetterUnknown(LetterError):
    pass


class LetterExpired(LetterError):
    def __init__(self, letter: Letter, message: Message) -> None:
        super().__init__("the letter's link has expired")
        self.letter = letter
        self.message = message


class ConsentIncomplete(LetterError):
    def __init__(self, missing: list[ShownBlock]) -> None:
        super().__init__("required declarations are missing: " + ", ".join(b.id for b in missing))
        self.missing = missing


@dataclass(frozen=True)
class FoundLetter:
    letter: Letter
    message: Message
    link: Link
    blocks: tuple[ShownBlock, ...]
    consent: Consent | None

    @property
    def released(self) -> bool:
        return self.letter.status == LetterStatus.RELEASED


@dataclass(frozen=True)
class Release:
    consent: Consent
    letter: Letter
    already: bool


class LetterDesk:
    """What the prospect's pages ask of letters: find one, release it."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        notify: Any,
        clock: Any,
    ) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.notify = notify
        self.clock = clock

    async def find(self, token: str) -> FoundLetter:
        """The letter behind a token; LetterUnknown or LetterExpired (unless released)."""
        async with self.db.transaction() as session:
            found = await self._find(session, token, lock=False)
        return found

    async def _find(self, session: Any, token: str, *, lock: bool) -> FoundLetter:
        if not token or len(token) > 100:
            raise LetterUnknown(token)
        query = (
            select(Letter, Message, Link)
            .join(Link, Link.id == Letter.link_id)
            .join(Message, Message.id == Letter.message_id)
            .where(Link.token_hash == hash_token(token), Link.kind == LinkKind.LETTER)
        )
        if lock:
            query = query.with_for_update(of=Letter)
        row = (await session.execute(query)).first()
        if row is None:
            raise LetterUnknown(token)
        letter, message, link = row
        consent = await session.scalar(select(Consent).where(Consent.letter_id == letter.id))
        expired = link.expired or link.expires_at <= self.clock()
        if expired and letter.status != LetterStatus.RELEASED:
            # the exception rolls the transaction back, which would expire (blank) the rows
            # it carries; detached first, they stay readable for the page that says "expired"
            session.expunge(letter)
            session.expunge(message)
            raise LetterExpired(letter, message)
        blocks = tuple(ShownBlock(**block) for block in letter.blocks)
        return FoundLetter(letter, message, link, blocks, consent)

    async def release(self, token: str, checked: set[str], ip: str, user_agent: str) -> Release:
        """Consent and release in one transaction; a second call changes nothing."""
        now = self.clock()
        async with self.db.transaction() as session:
            found = await self._find(session, token, lock=True)
            if found.consent is not None:
                return Release(found.consent, found.letter, already=True)
            missing = [b for b in found.blocks if b.required and b.id not in checked]
            if missing:
                raise ConsentIncomplete(missing)
            letter, message = found.letter, found.message
            sent = await session.scalar(
                select(Delivery).where(
                    Delivery.message_id == message.id,
                    Delivery.recipient == letter.recipient,
                    Delivery.blob == letter.letter_blob,
                )
            )
            sent_at = (
                sent.updated_at
                if sent is not None and sent.status == DeliveryStatus.DELIVERED
                else letter.created_at
            )
            consent_id = new_id()
            ticked = sorted(checked & {b.id for b in found.blocks})
            record = ConsentRecord(
                consent_id=consent_id,
                recipient=letter.recipient,
                subject=letter.subject,
                agent=message.sender,
                company=self.settings.branding.company_name,
                language=letter.language,
                letter_sent_at=sent_at,
                given_at=now,
                ip=ip,
                user_agent=user_agent[:1000],
                blocks=found.blocks,
                checked=frozenset(ticked),
                texts_sha256=letter.texts_sha256,
            )
            held = await self.blobs.read(letter.held_blob)
            released = (
                b"".join(evidence_fields(consent_id, now, ip, letter.texts_sha256, sent_at)) + held
            )
            released_blob = await self.blobs.put(released)
            # fpdf2 (with Pillow) costs ~44 MiB resident: only a release pays for it.
            from gateway import consent_pdf

            pdf = consent_pdf.render(record)
            pdf_blob = await self.blobs.put(pdf)
            notice = confirmation.compose_confirmation(
                record,
                pdf,
                agent_address=message.sender,
                hostname=self.settings.server.hostname,
                offer_subject=letter.subject,
            )
            lifetime = self.settings.upstream.queue_lifetime
            archive = [self.settings.letter.archive_bcc] if self.settings.letter.archive_bcc else []
            notice_message, notices = await compose_queued(
                self.blobs,
                notice,
                kind=MessageKind.CONFIRMATION,
                user_id=message.user_id,
                recipients=[message.sender, *archive],
                now=now,
                lifetime=lifetime,
            )
            # The released original first: the consent and the journal name that delivery.
            deliveries = [
                new_delivery(message.id, recipient, released_blob, now, lifetime)
                for recipient in (letter.recipient, *archive)
            ] + notices
            consent = Consent(
                id=consent_id,
                letter_id=letter.id,
                given_at=now,
                ip=ip,
                user_agent=user_agent[:1000],
                blocks=[asdict(b) for b in found.blocks],
                checked=ticked,
                texts_sha256=letter.texts_sha256,
                letter_sent_at=sent_at,
                pdf_blob=pdf_blob,
                released_delivery_id=deliveries[0].id,
            )
            letter.status = LetterStatus.RELEASED
            letter.released_at = now
            session.add(notice_message)
            session.add(consent)
            await session.flush()
            session.add_all(deliveries)
            await journal.append(
                session,
                [
                    journal.NewEvent(
                        "consent.given",
                        message.id,
                        data={
                            "consent_id": consent_id,
                            "letter_id": letter.id,
                            "recipient": letter.recipient,
                            "ip": ip,
                            "user_agent": user_agent[:300],
                            "texts_sha256": letter.texts_sha256,
                            "checked": ticked,
                        },
                    ),
                    journal.NewEvent(
                        "letter.released",
                        message.id,
                        deliveries[0].id,
                        {"consent_id": consent_id, "recipient": letter.recipient},
                    ),
                    *(
                        journal.NewEvent(
                            "delivery.queued", d.message_id, d.id, {"recipient": d.recipient}
                        )
                        for d in deliveries
                    ),
                ],
                now,
            )
        self.notify()
        log.info(
            "%s: consent=%s to=<%s>, ip=%s, letter=%s, status=released",
            message.id,
            consent_id,
            letter.recipient,
            ip,
            letter.id,
        )
        return Release(consent, letter, already=False)


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
        draft.events.append(
            journal.NewEvent(
                "letter.held",
                draft.message.id,
                data={
                    "recipient": recipient,
                    "letter_id": letter.id,
                    "expires_at": link.expires_at.isoformat(),
                    "texts_sha256": letter.texts_sha256,
                },
            )
        )
        return letter.letter_blob
