"""A registered letter for one recipient: the original held, the letter sent in its place.

The held original is what consent releases (gateway/letters/desk.py): its subject tag
taken off, its large attachments linked as any other copy's would be. The letter and the
archive's copy of it are left in the draft, committed with the message.
"""

from __future__ import annotations

from dataclasses import asdict

from gateway.config import Settings
from gateway.draft import Draft
from gateway.letters import letter_keys
from gateway.letters.blocks import BlockSets
from gateway.letters.compose import letter_for_held, remove_subject_tag
from gateway.letters.evidence import texts_sha256
from gateway.links.materializer import LinkAttachmentsMaterializer
from gateway.links.tokens import letter_url, new_link, new_token
from gateway.mail import headers
from gateway.outbound.queue import new_delivery
from gateway.store.blobs import BlobStore
from gateway.store.events import DELIVERY_QUEUED, LETTER_HELD
from gateway.store.models import Letter, LetterStatus, LinkKind, new_id
from rules.actions import LinkAttachments, RegisteredLetter


class RegisteredLetterMaterializer:
    """Holds the original for one recipient and returns the letter that goes out now."""

    def __init__(
        self, settings: Settings, blobs: BlobStore, links: LinkAttachmentsMaterializer
    ) -> None:
        self.settings = settings
        self.blobs = blobs
        self.links = links
        self.block_sets = BlockSets(settings)
        self.terms: dict[str, bytes] = {
            language: path.read_bytes() for language, path in settings.letter.terms_pdf.items()
        }

    async def __call__(self, draft: Draft, recipient: str, action: RegisteredLetter) -> str:
        letter_keys.require_key(self.settings, draft.raw)
        held = draft.raw
        if action.link_parts:
            plan = LinkAttachments(action.link_parts, action.download_days, action.language)
            held = await self.links.copy_with_links(draft, recipient, plan)
        if action.tag:
            held = remove_subject_tag(held, action.tag)
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
        letter_bytes = letter_for_held(
            self.settings,
            block_set,
            fields,
            sender=draft.message.sender,
            recipient=recipient,
            subject=subject,
            language=action.language,
            url=letter_url(self.settings.server.public_url, token),
            days=action.link_days,
            terms_pdf=self.terms.get(action.language),
            now=draft.now,
        )
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

    def _archive_copy(self, draft: Draft, letter_blob: str) -> None:
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
