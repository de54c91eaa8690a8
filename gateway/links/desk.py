"""What a visitor of a download link may read and write: the link, its views and downloads.

The web's download pages render and stream; every row and event a visit leaves is written
here, with the Postfix-style log line that goes with it.

- `record_download` counts by `UPDATE link_files SET downloads = downloads + 1 ...
  RETURNING downloads` in the same transaction as its event, so of two parallel first
  downloads exactly one is `download.first`.
- A zip is one `download.zip` and counts for no single file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import update

from gateway.links.tokens import (
    Closed,
    FoundLink,
    LinkState,
    TokenClosed,
    TokenUnknown,
    find_link,
    find_recipient_link,
)
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import (
    DOWNLOAD_FIRST,
    DOWNLOAD_REPEAT,
    DOWNLOAD_ZIP,
    LINK_VIEWED,
    FileDownload,
    LinkVisit,
    ZipDownload,
)
from gateway.store.models import LinkFile, Message, StoredFile

log = logging.getLogger(__name__)


class LinkUnknown(TokenUnknown):
    """No download link has this token."""


class LinkExpired(TokenClosed):
    """The link exists but no longer serves its files; `found` is what the page may name."""

    def __init__(self, found: FoundLink, reason: Closed = Closed.EXPIRED) -> None:
        super().__init__(reason)
        self.found = found


class LinkDesk:
    """Finds download links and records what their visitors do."""

    def __init__(self, db: Database, clock: Callable[[], datetime]) -> None:
        self.db = db
        self.clock = clock

    async def find(self, token: str) -> FoundLink:
        """The valid link behind `token`; LinkUnknown or LinkExpired otherwise."""
        async with self.db.transaction() as session:
            found = await find_link(session, token, self.clock())
        if found is None:
            raise LinkUnknown(token)
        if found.state is not LinkState.VALID:
            raise LinkExpired(found)
        return found

    async def recipient_link(self, message: Message, recipient: str) -> FoundLink | None:
        """The valid download link `message` made for `recipient`, if there is one: a
        registered letter's offer lists the files its held copy links to."""
        async with self.db.transaction() as session:
            found = await find_recipient_link(session, message, recipient, self.clock())
        return found if found is not None and found.state is LinkState.VALID else None

    async def record_view(self, found: FoundLink, ip: str, user_agent: str) -> None:
        """`link.viewed`: a page view, never a download."""
        event = LINK_VIEWED.new(_visit(found, ip, user_agent), message_id=found.link.message_id)
        async with self.db.transaction() as session:
            await journal.append(session, [event], self.clock())

    async def record_download(
        self, found: FoundLink, stored: StoredFile, ip: str, user_agent: str
    ) -> bool:
        """Count one download of `stored`; True when it was the link's first of that file.
        Nothing is written when the link lost the file since it was found."""
        now = self.clock()
        async with self.db.transaction() as session:
            downloads = (
                await session.execute(
                    update(LinkFile)
                    .where(LinkFile.link_id == found.link.id, LinkFile.file_id == stored.id)
                    .values(downloads=LinkFile.downloads + 1)
                    .returning(LinkFile.downloads)
                )
            ).scalar_one_or_none()
            if downloads is None:
                return False
            data: FileDownload = {
                **_visit(found, ip, user_agent),
                "file_id": stored.id,
                "filename": stored.filename,
            }
            first = downloads == 1
            event = (DOWNLOAD_FIRST if first else DOWNLOAD_REPEAT).new(
                data, message_id=found.link.message_id
            )
            await journal.append(session, [event], now)
        log.info(
            "%s: download=%s to=<%s>, ip=%s, file=%s %s",
            found.link.message_id,
            event.type.removeprefix("download."),
            found.link.recipient,
            ip,
            stored.id,
            json.dumps(stored.filename, ensure_ascii=False),
        )
        return first

    async def record_zip(self, found: FoundLink, ip: str, user_agent: str) -> None:
        """`download.zip` naming every file of the link."""
        data: ZipDownload = {
            **_visit(found, ip, user_agent),
            "files": [{"file_id": f.id, "filename": f.filename} for f in found.files],
        }
        event = DOWNLOAD_ZIP.new(data, message_id=found.link.message_id)
        async with self.db.transaction() as session:
            await journal.append(session, [event], self.clock())
        log.info(
            "%s: download=zip to=<%s>, ip=%s, files=%d",
            found.link.message_id,
            found.link.recipient,
            ip,
            len(found.files),
        )


def _visit(found: FoundLink, ip: str, user_agent: str) -> LinkVisit:
    return {
        "link_id": found.link.id,
        "recipient": found.link.recipient,
        "ip": ip,
        "user_agent": user_agent,
    }
