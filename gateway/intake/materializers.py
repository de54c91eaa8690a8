"""One materializer per action type: turn a recipient's plan into the copy they get.

Each is a small class of its own (the contract is gateway/draft.py `Materializer`); this is
the table the pipeline picks from, so a new kind of action adds one entry here.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.draft import Draft, Materializer, keep
from gateway.letters.materializer import RegisteredLetterMaterializer
from gateway.links.materializer import LinkAttachmentsMaterializer
from gateway.store.blobs import BlobStore
from gateway.store.events import POLICY_KEPT
from rules.actions import Action, KeepOriginal, LinkAttachments, RegisteredLetter, UnpackWinmail


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


class UnpackWinmailMaterializer:
    """The draft's message as it stands: each winmail.dat already replaced by its files
    (gateway/mail/winmail.py); one copy for every recipient who gets it."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    async def __call__(self, draft: Draft, recipient: str, action: UnpackWinmail) -> str:
        if draft.unpacked_copy is None:
            draft.unpacked_copy = await keep(self.blobs, draft.raw, draft.inline_blobs)
        return draft.unpacked_copy


def materializers(settings: Settings, blobs: BlobStore) -> dict[type[Action], Materializer]:
    links = LinkAttachmentsMaterializer(settings, blobs)
    return {
        KeepOriginal: KeepOriginalMaterializer(),
        LinkAttachments: links,
        RegisteredLetter: RegisteredLetterMaterializer(settings, blobs, links),
        UnpackWinmail: UnpackWinmailMaterializer(blobs),
    }
