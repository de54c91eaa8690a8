"""The recipient's copy with large attachments replaced by their personal download link.

One stored file (row and blob) per linked part, shared by every recipient of the message;
one link per recipient. A registered letter's held original is made the same way.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.draft import Draft
from gateway.links import linkblock
from gateway.links.tokens import download_url, new_link, new_token
from gateway.mail import mime
from gateway.store.blobs import BlobStore
from gateway.store.events import LINK_CREATED
from gateway.store.models import LinkKind, StoredFile, new_id
from rules.actions import LinkAttachments


class LinkAttachmentsMaterializer:
    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs

    async def __call__(self, draft: Draft, recipient: str, action: LinkAttachments) -> str:
        return await self.blobs.put(await self.copy_with_links(draft, recipient, action))

    async def copy_with_links(self, draft: Draft, recipient: str, action: LinkAttachments) -> bytes:
        """The draft's message with the planned parts replaced by the recipient's own link."""
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
        without, root = _without_parts(draft, action.part_ids)
        return mime.add_link_block(without, root, text, html)

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
            filename=(part.filename or mime.name_for_unnamed(draft.raw, part))[:255],
            content_type=part.content_type,
            size=len(data),
            created_at=draft.now,
        )
        draft.files[part_id] = stored
        draft.rows.append(stored)
        return stored


def _without_parts(draft: Draft, part_ids: tuple[str, ...]) -> tuple[bytes, mime.MimePart]:
    """The message without these parts, parsed: the same for every recipient, so made once.
    With a 25 MB attachment, parsing the original again per recipient cost more than
    sending the copy."""
    stripped = draft.stripped.get(part_ids)
    if stripped is None:
        without = mime.remove_parts(draft.raw, draft.root, part_ids)
        stripped = draft.stripped[part_ids] = (without, mime.parse(without))
    return stripped
