"""One materializer per action type: turn a recipient's plan into the copy they get.

Each is a small class of its own (the contract is gateway/draft.py `Materializer`); this is
the table the pipeline picks from, so a new kind of action adds one entry here.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.draft import Draft, Materializer
from gateway.letters.materializer import RegisteredLetterMaterializer
from gateway.links.materializer import LinkAttachmentsMaterializer
from gateway.store.blobs import BlobStore
from gateway.store.events import POLICY_KEPT
from rules.actions import Action, KeepOriginal, LinkAttachments, RegisteredLetter


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


def materializers(settings: Settings, blobs: BlobStore) -> dict[type[Action], Materializer]:
    links = LinkAttachmentsMaterializer(settings, blobs)
    return {
        KeepOriginal: KeepOriginalMaterializer(),
        LinkAttachments: links,
        RegisteredLetter: RegisteredLetterMaterializer(settings, blobs, links),
    }
