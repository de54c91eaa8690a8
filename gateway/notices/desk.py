"""The agent's optional notices: first downloads (from the journal) and letters about to expire.

**First downloads** are read from the journal after commit, by a cursor (`notice_cursor`), as
the webhook fan-out reads it (gateway/webhooks/fanout.py, which says why seq order is commit
order). The cursor moves over ``download.first`` events only (the rest of the journal is
never read, and a round without a first download writes nothing, so mail traffic pays
nothing). One transaction locks the cursor, reads the settled ``download.first`` events after it,
queues one notice per message and recipient through the one door (local_mail.enqueue),
journals ``notice.download_queued`` and moves the cursor: a crash before the commit leaves the
cursor where it was and the next round does it all again, a crash after it has the notice
durable in the queue, so none is lost and none is doubled. Driving it from the journal rather
than inside the download's transaction keeps the download fast (no mail rendered, no blob
written while the prospect waits) and lets several files fetched one after another make one
mail: an event is taken only once it is ``download_batch_seconds`` old, the first downloads
of one recipient taken together make one notice, and a burst still going on at the cut-off
(the next file within the window) waits for the next round whole. Scanner fetches are
``download.automated`` and never ``download.first``, so they never notify.

**Expiry warnings**: the worker's periodic round (serve's sweep, next to
``LetterDesk.expire_due``) finds letters still held whose link runs out within
``expiry_warning_days`` and not yet warned, marks ``letters.expiry_warned_at``, queues the
warning and journals ``letter.expiry_warned`` in one transaction: never twice for one expiry
(an agent who extends the link gets one warning for the new date).

Preferences are read when the notice is written (gateway/users.py ``NoticePrefs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from itertools import groupby

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.notices.mails import (
    FirstDownloads,
    WaitingLetter,
    expiry_warning_mail,
    first_download_mail,
)
from gateway.outbound.local_mail import enqueue
from gateway.store import journal
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.events import (
    DOWNLOAD_FIRST,
    LETTER_EXPIRY_WARNED,
    NOTICE_DOWNLOAD_QUEUED,
    NewEvent,
)
from gateway.store.models import (
    Event,
    Letter,
    LetterStatus,
    Link,
    Message,
    MessageKind,
    NoticeCursor,
    User,
)
from gateway.users import NoticePrefs

log = logging.getLogger(__name__)

BATCH = 500


class NoticeDesk:
    """Writes the agent's optional notices; `notify` wakes the delivery worker."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        notify: Callable[[], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.notify = notify
        self.clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        """Look for settled first downloads every `[worker] poll_seconds` until `stop`."""
        while not stop.is_set():
            try:
                await self.first_downloads()
            except Exception:
                log.exception("first-download notices failed; trying again next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.worker.poll_seconds)

    # -- first downloads ---------------------------------------------------------------------

    async def first_downloads(self) -> int:
        """Queue the notices for every settled first download; how many notices."""
        cutoff = self.clock() - timedelta(seconds=self.settings.notices.download_batch_seconds)
        async with self.db.snapshot() as session:  # a read first: idle rounds write nothing
            done = await session.scalar(select(NoticeCursor.seq).where(NoticeCursor.id == 1))
            waiting = await session.scalar(
                select(Event.seq)
                .where(
                    Event.seq > (done or 0),
                    Event.type == DOWNLOAD_FIRST.name,
                    Event.at <= cutoff,
                )
                .limit(1)
            )
        if waiting is None:
            return 0
        total = 0
        while True:
            async with self.db.transaction() as session:
                taken, queued = await self._download_batch(session, cutoff)
            total += queued
            if taken < BATCH:
                break
        if total:
            self.notify()
        return total

    async def _download_batch(self, session: AsyncSession, cutoff: datetime) -> tuple[int, int]:
        """(events taken, notices queued) for one batch after the cursor, in `session`."""
        cursor = (
            await session.execute(
                select(NoticeCursor).where(NoticeCursor.id == 1).with_for_update()
            )
        ).scalar_one()
        events = (
            await session.scalars(
                select(Event)
                .where(Event.seq > cursor.seq, Event.type == DOWNLOAD_FIRST.name)
                .order_by(Event.seq)
                .limit(BATCH)
            )
        ).all()
        window = timedelta(seconds=self.settings.notices.download_batch_seconds)
        settled = _whole_bursts(events, cutoff, window)
        if not settled:
            return 0, 0
        firsts = sorted(
            (e for e in settled if e.message_id is not None),
            key=lambda e: (*_downloader(e), e.seq),
        )
        now = self.clock()
        journaled: list[NewEvent] = []
        queued = 0
        for (message_id, recipient), group in groupby(firsts, key=_downloader):
            notice = await self._download_notice(session, message_id, recipient, list(group), now)
            if notice:
                journaled.extend(notice)
                queued += 1
        cursor.seq = journal.seq_of(settled[-1])
        await journal.append(session, journaled, now)
        return len(settled), queued

    async def _download_notice(
        self,
        session: AsyncSession,
        message_id: str,
        recipient: str,
        events: Sequence[Event],
        now: datetime,
    ) -> list[NewEvent]:
        """The notice for one recipient's first downloads of one message; [] when none goes."""
        message = await session.get(Message, message_id)
        if message is None or not message.sender:
            return []
        if not await self._wants(session, message.user_id, "first_download"):
            return []
        filenames = tuple(dict.fromkeys(str(e.data["filename"]) for e in events))
        mail = first_download_mail(
            FirstDownloads(
                message_id=message.id,
                recipient=recipient,
                offer_subject=message.subject,
                filenames=filenames,
                at=events[0].at,
            ),
            agent_address=message.sender,
            public_url=self.settings.server.public_url,
            language=self.settings.policy.language,
            zone=self.settings.branding.timezone,
        )
        queued = await enqueue(
            session,
            self.blobs,
            self.settings,
            mail,
            kind=MessageKind.CONFIRMATION,
            user_id=message.user_id,
            now=now,
        )
        log.info(
            "%s: notice=first-download to=<%s> recipient=<%s> files=%d",
            message.id,
            message.sender,
            recipient,
            len(filenames),
        )
        return [
            NOTICE_DOWNLOAD_QUEUED.new(
                {
                    "recipient": recipient,
                    "file_ids": list(dict.fromkeys(str(e.data["file_id"]) for e in events)),
                    "first_seq": journal.seq_of(events[0]),
                    "notice_message_id": queued.message.id,
                },
                message_id=message.id,
            ),
            *queued.events,
        ]

    # -- letters about to expire -------------------------------------------------------------

    async def expiry_warnings(self, now: datetime) -> int:
        """Warn the agents of held letters whose link runs out within `expiry_warning_days`;
        each letter once. How many letters were looked at and marked."""
        window = timedelta(days=self.settings.notices.expiry_warning_days)
        soon = now + window
        total = 0
        while True:
            async with self.db.transaction() as session:
                rows = (
                    await session.execute(
                        select(Letter, Message, Link)
                        .join(Link, Link.id == Letter.link_id)
                        .join(Message, Message.id == Letter.message_id)
                        .where(
                            Letter.status == LetterStatus.HELD,
                            # never twice for one expiry: a link warned about runs out within
                            # `window` of the warning, so an older warning means the link
                            # was extended since, and the new date earns one of its own
                            or_(
                                Letter.expiry_warned_at.is_(None),
                                Letter.expiry_warned_at < now - window,
                            ),
                            Link.expires_at > now,
                            Link.expires_at <= soon,
                            Link.revoked_at.is_(None),
                        )
                        .order_by(Link.expires_at)
                        .limit(BATCH)
                        .with_for_update(of=Letter, skip_locked=True)
                    )
                ).all()
                events: list[NewEvent] = []
                for letter, message, link in rows:
                    letter.expiry_warned_at = now  # marked even when no mail goes: never later
                    events.extend(await self._expiry_warning(session, letter, message, link, now))
                await journal.append(session, events, now)
            total += len(rows)
            if len(rows) < BATCH:
                break
        if total:
            self.notify()
        return total

    async def _expiry_warning(
        self, session: AsyncSession, letter: Letter, message: Message, link: Link, now: datetime
    ) -> list[NewEvent]:
        if not message.sender or not await self._wants(session, message.user_id, "expiry_warning"):
            return []
        mail = expiry_warning_mail(
            WaitingLetter(
                letter_id=letter.id,
                message_id=message.id,
                recipient=letter.recipient,
                offer_subject=letter.subject,
                letter_sent=letter.created_at,
                expires=link.expires_at,
            ),
            agent_address=message.sender,
            public_url=self.settings.server.public_url,
            language=self.settings.policy.language,
            zone=self.settings.branding.timezone,
        )
        queued = await enqueue(
            session,
            self.blobs,
            self.settings,
            mail,
            kind=MessageKind.CONFIRMATION,
            user_id=message.user_id,
            now=now,
        )
        log.info(
            "%s: notice=expiry-warning to=<%s> letter=%s", message.id, message.sender, letter.id
        )
        return [
            LETTER_EXPIRY_WARNED.new(
                {
                    "letter_id": letter.id,
                    "recipient": letter.recipient,
                    "expires_at": link.expires_at.isoformat(),
                    "notice_message_id": queued.message.id,
                },
                message_id=message.id,
            ),
            *queued.events,
        ]

    async def _wants(self, session: AsyncSession, user_id: int | None, kind: str) -> bool:
        """The sender's choice, else their group's default ([[groups]] notices), else
        `[notices]`; a message from a trusted network (no user) gets `[notices]`."""
        stored: dict[str, bool] = {}
        group: str | None = None
        if user_id is not None:
            row = (
                await session.execute(
                    select(User.notify, User.group_name).where(User.id == user_id)
                )
            ).one_or_none()
            if row is not None:
                stored, group = row.notify, row.group_name
        prefs = NoticePrefs.of(stored or {}, self.settings.notices_for(group))
        return bool(getattr(prefs, kind))


def _downloader(event: Event) -> tuple[str, str]:
    """Whose first downloads one notice reports: a message's recipient."""
    return event.message_id or "", str(event.data.get("recipient", ""))


def _whole_bursts(events: Sequence[Event], cutoff: datetime, window: timedelta) -> list[Event]:
    """The first downloads to take now: those up to the first one newer than `cutoff`, and of these
    only those before a recipient's burst that goes on past the cut-off (a first download
    taken now while the same recipient's next one, within `window`, is not yet settled): the
    burst is taken whole in a later round, so it makes one mail."""
    settled = next(
        (events[:i] for i, event in enumerate(events) if event.at > cutoff), list(events)
    )
    later: dict[tuple[str, str], datetime] = {}
    for event in events[len(settled) :]:
        if event.type == DOWNLOAD_FIRST.name:
            later.setdefault(_downloader(event), event.at)
    last: dict[tuple[str, str], datetime] = {}
    first_index: dict[tuple[str, str], int] = {}
    for index, event in enumerate(settled):
        if event.type == DOWNLOAD_FIRST.name:
            last[_downloader(event)] = event.at
            first_index.setdefault(_downloader(event), index)
    ongoing = [
        first_index[key] for key, at in later.items() if key in last and at - last[key] <= window
    ]
    return list(settled[: min(ongoing)] if ongoing else settled)
