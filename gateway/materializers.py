"""One materializer per action type: turn a recipient's plan into the copy they get.

A materializer writes what it makes durably (blobs) and leaves the rows and events it wants
committed in the `Draft`, so the pipeline commits everything in its one transaction.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway import journal, linkblock, mime
from gateway.blobstore import BlobStore
from gateway.config import Settings
from gateway.events import LINK_CREATED, POLICY_KEPT
from gateway.links import download_url, new_link, new_token
from gateway.models import Base, LinkKind, Message, StoredFile, new_id
from rules.actions import Action, KeepOriginal, LinkAttachments, RegisteredLetter


@dataclass
class Draft:
    """A message on its way to being committed: what every materializer adds to."""

    message: Message
    now: datetime
    raw: bytes
    root: mime.MimePart
    copy_base: str
    rows: list[Base] = field(default_factory=list)
    events: list[journal.NewEvent] = field(default_factory=list)
    files: dict[str, StoredFile] = field(default_factory=dict)


class Materializer(Protocol):
    async def __call__(self, draft: Draft, recipient: str, action: Any) -> str:
        """The digest of the recipient's copy, already durable."""
        ...


class KeepOriginalMaterializer:
    async def __call__(self, draft: Draft, recipient: str, action: KeepOriginal) -> str:
        if action.reason:
            draft.events.append(
                POLICY_KEPT.new(
                    {"recipient": recipient, "reason": action.reason},
                    message_id=draft.message.id,
                )
            )
        return draft.copy_base


class LinkAttachmentsMaterializer:
    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs

    async def __call__(self, draft: Draft, recipient: str, action: LinkAttachments) -> str:
        return await self.blobs.put(await self.copy_with_links(draft, draft.raw, recipient, action))

    async def copy_with_links(
        self, draft: Draft, raw: bytes, recipient: str, action: LinkAttachments
    ) -> bytes:
        """`raw` (the draft's bytes, or a copy differing only in top-level fields) with the
        planned parts replaced by the recipient's own link."""
        files = [await self._stored_file(draft, part_id) for part_id in action.part_ids]
        token = new_token()
        link, entries = new_link(
            token=token,
            kind=LinkKind.DOWNLOAD,
            message_id=draft.message.id,
            recipient=recipient,
            language=action.language,
            now=draft.now,
            days=action.days,
            files=files,
        )
        draft.rows.extend([link, *entries])
        draft.events.append(
            LINK_CREATED.new(
                {
                    "recipient": recipient,
                    "link_id": link.id,
                    "files": [f.filename for f in files],
                    "expires_at": link.expires_at.isoformat(),
                },
                message_id=draft.message.id,
            )
        )
        text, html = linkblock.render(
            action.language,
            download_url(self.settings.server.public_url, token),
            files,
            link.expires_at,
            self.settings.branding.primary_color,
            self.settings.branding.timezone,
        )
        without = mime.remove_parts(raw, mime.parse(raw), action.part_ids)
        return mime.add_link_block(without, mime.parse(without), text, html)

    async def _stored_file(self, draft: Draft, part_id: str) -> StoredFile:
        """One row and one blob per linked part, shared by every recipient's link."""
        if part_id in draft.files:
            return draft.files[part_id]
        part = next(p for p in draft.root.walk() if p.id == part_id)
        data = mime.decoded_body(draft.raw, part)
        stored = StoredFile(
            id=new_id(),
            message_id=draft.message.id,
            sha256=await self.blobs.put(data),
            filename=(part.filename or _fallback_name(part))[:255],
            content_type=part.content_type,
            size=len(data),
            created_at=draft.now,
        )
        draft.files[part_id] = stored
        draft.rows.append(stored)
        return stored


def _fallback_name(part: mime.MimePart) -> str:
    extension = mimetypes.guess_extension(part.content_type) or ".bin"
    return f"attachment-{part.id}{extension}"


def materializers(settings: Settings, blobs: BlobStore) -> dict[type[Action], Materializer]:
    from gateway.registered_letter import RegisteredLetterMaterializer

    links = LinkAttachmentsMaterializer(settings, blobs)
    return {
        KeepOriginal: KeepOriginalMaterializer(),
        LinkAttachments: links,
        RegisteredLetter: RegisteredLetterMaterializer(settings, blobs, links),
    }
