"""The recipient's copy with large attachments replaced by their personal download link.

One stored file (row and blob) per linked part, shared by every recipient of the message;
one link per recipient. A registered letter's held original is made the same way. A linked
winmail.dat is stored as the files it carries (gateway/mail/tnef.py), when they are all it
carries.
"""

from __future__ import annotations

import logging

from gateway.config import Settings
from gateway.draft import Draft
from gateway.links import linkblock
from gateway.links.tokens import download_url, new_link, new_token
from gateway.mail import mime, tnef
from gateway.store.blobs import BlobStore
from gateway.store.events import LINK_CREATED
from gateway.store.models import LinkKind, StoredFile, new_id
from rules.actions import LinkAttachments

log = logging.getLogger(__name__)


class LinkAttachmentsMaterializer:
    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs

    async def __call__(self, draft: Draft, recipient: str, action: LinkAttachments) -> str:
        return await self.blobs.put(await self.copy_with_links(draft, recipient, action))

    async def copy_with_links(self, draft: Draft, recipient: str, action: LinkAttachments) -> bytes:
        """The draft's message with the planned parts replaced by the recipient's own link."""
        files = [f for part_id in action.part_ids for f in await self._stored_files(draft, part_id)]
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
        without, root = _without_parts(draft, action.part_ids)
        return mime.add_link_block(without, root, text, html)

    async def _stored_files(self, draft: Draft, part_id: str) -> list[StoredFile]:
        """The part's rows and blobs, shared by every recipient's link."""
        if part_id in draft.files:
            return draft.files[part_id]
        part = next(p for p in draft.root.walk() if p.id == part_id)
        data = mime.decoded_body(draft.raw, part)
        name = part.filename or mime.name_for_unnamed(draft.raw, part)
        pieces = [tnef.CarriedFile(name, part.content_type, data)]
        if tnef.is_tnef(part.content_type, part.filename):
            pieces = _unpacked(data, draft.message.id) or pieces
        stored = [await self._stored(draft, piece) for piece in pieces]
        draft.files[part_id] = stored
        draft.rows.extend(stored)
        return stored

    async def _stored(self, draft: Draft, piece: tnef.CarriedFile) -> StoredFile:
        return StoredFile(
            id=new_id(),
            message_id=draft.message.id,
            sha256=await self.blobs.put(piece.data),
            filename=piece.filename[:255],
            content_type=piece.content_type,
            size=len(piece.data),
            created_at=draft.now,
        )


def _unpacked(data: bytes, message_id: str) -> list[tnef.CarriedFile] | None:
    try:
        return tnef.carried_files(data)
    except tnef.Unreadable as exc:
        log.info("message %s: winmail.dat linked whole, unreadable: %s", message_id, exc)
        return None


def _without_parts(draft: Draft, part_ids: tuple[str, ...]) -> tuple[bytes, mime.MimePart]:
    """The message without these parts, parsed: the same for every recipient, so made once.
    With a 25 MB attachment, parsing the original again per recipient cost more than
    sending the copy."""
    stripped = draft.stripped.get(part_ids)
    if stripped is None:
        without = mime.remove_parts(draft.raw, draft.root, part_ids)
        stripped = draft.stripped[part_ids] = (without, mime.parse(without))
    return stripped
