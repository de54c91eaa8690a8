"""A message on its way to being committed, and the contract of every materializer.

A materializer writes what it makes durably (blobs) and leaves the rows and events it wants
committed in the `Draft`, so the pipeline commits everything in its one transaction. Apart
from the materializers, so each of them and the pipeline depend on this and not on each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway.mail import mime
from gateway.store import journal
from gateway.store.blobs import BlobStore, HashedFile
from gateway.store.models import Base, Message, StoredFile


@dataclass
class Draft:
    """A message on its way to being committed: what every materializer adds to."""

    message: Message
    now: datetime
    # what the plan reads and every copy the relay changes is made from: the original
    # without the fields no copy carries, a winmail.dat unpacked (gateway/mail/winmail.py)
    raw: bytes
    root: mime.MimePart
    copy_base: str  # the digest of the unchanged copy
    base: bytes  # its bytes: the original without the fields no copy carries
    rows: list[Base] = field(default_factory=list)
    events: list[journal.NewEvent] = field(default_factory=list)
    files: dict[str, StoredFile] = field(default_factory=dict)
    # the message without linked parts, parsed, by the ids of those parts
    stripped: dict[tuple[str, ...], tuple[bytes, mime.MimePart]] = field(default_factory=dict)
    # small blobs committed with the rows instead of put (gateway/store/inline_blobs.py)
    inline_blobs: dict[str, bytes] = field(default_factory=dict)
    # the names of the files a winmail.dat carried, now parts of `raw` in its place
    unpacked: list[str] = field(default_factory=list)
    # the digest of `raw` as a copy, once a recipient's copy is the message unpacked
    unpacked_copy: str | None = None


async def keep(
    blobs: BlobStore, data: bytes, inline: dict[str, bytes], file: HashedFile | None = None
) -> str:
    """`data` durable by the commit: put in the blob store, or, when it is small, left in
    `inline` for the commit's transaction, where it needs no fsync of its own
    (gateway/store/inline_blobs.py). `file`, when given, holds `data` already."""
    if not blobs.takes_inline(len(data)):
        if file is not None and file.size == len(data):
            return await blobs.put_file(file)
        return await blobs.put(data)
    digest = hashlib.sha256(data).hexdigest()
    inline[digest] = data
    return digest


class Materializer(Protocol):
    async def __call__(self, draft: Draft, recipient: str, action: Any) -> str:
        """The digest of the recipient's copy, already durable."""
        ...
