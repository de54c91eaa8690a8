"""A message on its way to being committed, and the contract of every materializer.

A materializer writes what it makes durably (blobs) and leaves the rows and events it wants
committed in the `Draft`, so the pipeline commits everything in its one transaction. Apart
from the materializers, so each of them and the pipeline depend on this and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway.mail import mime
from gateway.store import journal
from gateway.store.models import Base, Message, StoredFile


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
    # the stored files of each linked part (more than one: a winmail.dat's)
    files: dict[str, list[StoredFile]] = field(default_factory=dict)
    # the message without linked parts, parsed, by the ids of those parts
    stripped: dict[tuple[str, ...], tuple[bytes, mime.MimePart]] = field(default_factory=dict)
    # small blobs committed with the rows instead of put (gateway/store/inline_blobs.py)
    inline_blobs: dict[str, bytes] = field(default_factory=dict)


class Materializer(Protocol):
    async def __call__(self, draft: Draft, recipient: str, action: Any) -> str:
        """The digest of the recipient's copy, already durable."""
        ...
