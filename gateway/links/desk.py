"""What a visitor of a download link may read and write: the link, its views and downloads.

The web's download pages render and stream; every row and event a visit leaves is written
here, with the Postfix-style log line that goes with it.

- `record_download` counts by `UPDATE link_files SET downloads = downloads + 1 ...
  RETURNING downloads` in the same transaction as its event, so of two parallel first
  downloads exactly one is `download.first`.
- A zip is one `download.zip` and counts for no single file.
- A visit that looks like a link scanner's (rules/automated_visits.py) is journaled with
  `automated` and its reasons; a scanner's download is `download.automated` and never touches
  the counter, so "first" always means a person.

And what an agent does to links (the console and the API call these): `revoke`, `extend`,
`preview`. Each names its actor in the journal and writes nothing when it refuses
(gateway/agent_actions.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.agent_actions import (
    InvalidRequest,
    UnknownTarget,
    WrongState,
    checked_actor,
    checked_reason,
)
from gateway.config import DOWNLOAD_LINK_DAYS_MAX, LETTER_LINK_DAYS_MAX
from gateway.links.tokens import (
    Closed,
    FoundLink,
    LinkState,
    TokenClosed,
    TokenUnknown,
    delivered_at,
    find_recipient_link,
    found_of,
    read_link,
)
from gateway.store import group_commit, journal
from gateway.store.db import Database
from gateway.store.events import (
    DOWNLOAD_AUTOMATED,
    DOWNLOAD_FIRST,
    DOWNLOAD_REPEAT,
    DOWNLOAD_ZIP,
    LINK_EXTENDED,
    LINK_REVOKED,
    LINK_VIEWED,
    FileDownload,
    LinkVisit,
    NewEvent,
    ZipDownload,
)
from gateway.store.group_commit import Done
from gateway.store.models import (
    Letter,
    LetterStatus,
    Link,
    LinkFile,
    LinkKind,
    Message,
    StoredFile,
)
from rules.automated_visits import ScannerRules, Verdict, VisitFacts, classify

# The longest a link may be given, in days from now: the policy's own maxima.
MAX_DAYS = {LinkKind.DOWNLOAD: DOWNLOAD_LINK_DAYS_MAX, LinkKind.LETTER: LETTER_LINK_DAYS_MAX}

log = logging.getLogger(__name__)


class LinkUnknown(TokenUnknown):
    """No download link has this token."""


class LinkExpired(TokenClosed):
    """The link exists but no longer serves its files; `found` is what the page may name."""

    def __init__(self, found: FoundLink, reason: Closed = Closed.EXPIRED) -> None:
        super().__init__(reason)
        self.found = found


class LinkDesk:
    """Finds download links, records what their visitors do, and carries out what agents do
    to links."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], datetime],
        *,
        scanners: ScannerRules | None = None,
        link_grace: timedelta = timedelta(days=7),
    ) -> None:
        self.db = db
        self.clock = clock
        self.scanners = scanners or ScannerRules()
        # how long an expired link's files outlive it ([storage] blob_grace_days): until
        # then an agent may open it again
        self.link_grace = link_grace

    async def find(self, token: str) -> FoundLink:
        """The valid link behind `token`; LinkUnknown or LinkExpired (expired or revoked)."""
        now = self.clock()
        found = await self.db.read(lambda connection: read_link(connection, token, now))
        if found is None:
            raise LinkUnknown(token)
        if found.state is LinkState.REVOKED:
            raise LinkExpired(found, Closed.REVOKED)
        if found.state is not LinkState.VALID:
            raise LinkExpired(found)
        return found

    async def judge(
        self, found: FoundLink, ip: str, user_agent: str, method: str, has_cookie: bool
    ) -> Verdict:
        now = self.clock()
        if found.delivered is not None:
            delivered = found.delivered.at
        else:
            delivered = await copy_delivered_at(self.db, found.link, now)
        return judge_visit(
            self.scanners, found.link, now, ip, user_agent, method, has_cookie, delivered
        )

    async def recipient_link(self, message: Message, recipient: str) -> FoundLink | None:
        """The valid download link `message` made for `recipient`, if there is one: a
        registered letter's offer lists the files its held copy links to."""
        async with self.db.transaction() as session:
            found = await find_recipient_link(session, message, recipient, self.clock())
        return found if found is not None and found.state is LinkState.VALID else None

    async def record_view(
        self,
        found: FoundLink,
        ip: str,
        user_agent: str,
        *,
        method: str = "GET",
        has_cookie: bool = False,
    ) -> Verdict:
        """`link.viewed`: a page view, never a download; marked when it looks automated."""
        verdict = await self.judge(found, ip, user_agent, method, has_cookie)
        event = LINK_VIEWED.new(
            _visit(found, ip, user_agent, verdict), message_id=found.link.message_id
        )
        await journal_visit(self.db, event, self.clock())
        return verdict

    async def record_download(
        self,
        found: FoundLink,
        stored: StoredFile,
        ip: str,
        user_agent: str,
        *,
        method: str = "GET",
        has_cookie: bool = False,
    ) -> bool:
        """Count one download of `stored`; True when it was the link's first of that file.
        Nothing is written when the link lost the file since it was found. A scanner's
        fetch is `download.automated` and counts nothing."""
        now = self.clock()
        verdict = await self.judge(found, ip, user_agent, method, has_cookie)
        if verdict.automated:
            await self._record_automated_download(found, stored, ip, user_agent, verdict)
            return False
        data: FileDownload = {
            **_visit(found, ip, user_agent, verdict),
            "file_id": stored.id,
            "filename": stored.filename,
        }
        event = await group_commit.submit(
            self.db, _CountDownload(found.link.id, stored.id, data, found.link.message_id, now)
        )
        if event is None:
            return False
        first = event.type == DOWNLOAD_FIRST.name
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

    async def _record_automated_download(
        self, found: FoundLink, stored: StoredFile, ip: str, user_agent: str, verdict: Verdict
    ) -> None:
        data: FileDownload = {
            **_visit(found, ip, user_agent, verdict),
            "file_id": stored.id,
            "filename": stored.filename,
        }
        event = DOWNLOAD_AUTOMATED.new(data, message_id=found.link.message_id)
        await journal_visit(self.db, event, self.clock())
        log.info(
            "%s: download=automated to=<%s>, ip=%s, file=%s, why=%s",
            found.link.message_id,
            found.link.recipient,
            ip,
            stored.id,
            "; ".join(verdict.reasons),
        )

    async def record_zip(
        self,
        found: FoundLink,
        ip: str,
        user_agent: str,
        *,
        method: str = "GET",
        has_cookie: bool = False,
    ) -> None:
        """`download.zip` naming every file of the link; marked when it looks automated."""
        verdict = await self.judge(found, ip, user_agent, method, has_cookie)
        data: ZipDownload = {
            **_visit(found, ip, user_agent, verdict),
            "files": [{"file_id": f.id, "filename": f.filename} for f in found.files],
        }
        event = DOWNLOAD_ZIP.new(data, message_id=found.link.message_id)
        await journal_visit(self.db, event, self.clock())
        log.info(
            "%s: download=zip to=<%s>, ip=%s, files=%d",
            found.link.message_id,
            found.link.recipient,
            ip,
            len(found.files),
        )

    # -- what agents do

    async def revoke(
        self, message_id: str, recipient: str, actor: str, reason: str = ""
    ) -> list[str]:
        """End every link (download and letter) `message_id` made for `recipient`, now.

        Returns the ids of the links this call ended; a second call ends none and writes
        nothing. UnknownTarget when the message made no link for that recipient.
        """
        actor = checked_actor(actor)
        reason = checked_reason(reason, required=False)
        now = self.clock()
        async with self.db.transaction() as session:
            links = await _recipient_links(session, message_id, recipient)
            ended = [link for link in links if link.revoked_at is None]
            for link in ended:
                link.revoked_at = now
            await journal.append(
                session,
                [
                    LINK_REVOKED.new(
                        {
                            "link_id": link.id,
                            "recipient": link.recipient,
                            "kind": link.kind,
                            "actor": actor,
                            "reason": reason,
                        },
                        message_id=link.message_id,
                    )
                    for link in ended
                ],
                now,
            )
        for link in ended:
            log.info(
                "%s: link=%s to=<%s>, status=revoked, by=%s",
                link.message_id,
                link.id,
                link.recipient,
                actor,
            )
        return [link.id for link in ended]

    async def extend(self, target: str | tuple[str, str], until: datetime, actor: str) -> list[str]:
        """Give a link (by id) or a recipient's links (message id, recipient) a new expiry.

        `until` must lie in the future and at most the policy's maximum days ahead. An
        expired link whose files are still kept opens again (so does its letter); a revoked
        link is WrongState: ending access is not undone by a date. Returns the links' ids.
        """
        actor = checked_actor(actor)
        now = self.clock()
        if until.tzinfo is None:
            raise InvalidRequest("action.expiry_zone")
        if until <= now:
            raise InvalidRequest("action.expiry_past")
        async with self.db.transaction() as session:
            links = await self._extendable(session, target, now)
            events: list[NewEvent] = []
            for link in links:
                longest = now + timedelta(days=MAX_DAYS[LinkKind(link.kind)])
                if until > longest:
                    raise InvalidRequest(
                        f"action.expiry_beyond_{link.kind}", days=MAX_DAYS[LinkKind(link.kind)]
                    )
                events.append(
                    LINK_EXTENDED.new(
                        {
                            "link_id": link.id,
                            "recipient": link.recipient,
                            "kind": link.kind,
                            "actor": actor,
                            "expires_at": until.isoformat(),
                            "previous_expires_at": link.expires_at.isoformat(),
                        },
                        message_id=link.message_id,
                    )
                )
                link.expires_at = until
                link.expired = False
                if link.kind == LinkKind.LETTER:
                    await _reopen_letter(session, link)
            await journal.append(session, events, now)
        return [link.id for link in links]

    async def _extendable(
        self, session: AsyncSession, target: str | tuple[str, str], now: datetime
    ) -> Sequence[Link]:
        if isinstance(target, str):
            link = await session.scalar(select(Link).where(Link.id == target).with_for_update())
            if link is None:
                raise UnknownTarget("action.no_link", link=target)
            links: Sequence[Link] = [link]
        else:
            links = await _recipient_links(session, *target)
            live = [link for link in links if link.revoked_at is None]
            links = live or links  # only revoked ones: refused just below, by name
        for link in links:
            if link.revoked_at is not None:
                raise WrongState("action.revoked", link=link.id)
            if link.kind == LinkKind.DOWNLOAD and link.expires_at <= now - self.link_grace:
                raise WrongState("action.files_gone", link=link.id, day=link.expires_at)
        return links

    async def preview(self, link_id: str, actor: str) -> FoundLink:
        """What the download page of `link_id` shows, its state included, for the console:
        reads only, records no view, counts nothing; only the log says who looked."""
        actor = checked_actor(actor)
        async with self.db.transaction() as session:
            row = (
                await session.execute(
                    select(Link, Message)
                    .join(Message, Message.id == Link.message_id)
                    .where(Link.id == link_id, Link.kind == LinkKind.DOWNLOAD)
                )
            ).first()
            if row is None:
                raise UnknownTarget("action.no_download_link", link=link_id)
            found = await found_of(session, row[0], row[1], self.clock())
        log.info("%s: link=%s previewed by=%s", found.link.message_id, found.link.id, actor)
        return found


def judge_visit(
    rules: ScannerRules,
    link: Link,
    now: datetime,
    ip: str,
    user_agent: str,
    method: str,
    has_cookie: bool,
    delivered_at: datetime | None = None,
) -> Verdict:
    """A person's visit or a link scanner's (rules/automated_visits.py). Scanners fetch a
    link seconds after its mail was delivered: `delivered_at` is when the recipient's copy
    was (copy_delivered_at); the link's creation stands in while no copy is."""
    since = (now - (delivered_at or link.created_at)).total_seconds()
    return classify(VisitFacts(method, user_agent, has_cookie, ip, since), rules)


async def copy_delivered_at(db: Database, link: Link, now: datetime) -> datetime | None:
    """When the newest copy of the link's message to its recipient was accepted upstream,
    between the link's creation and `now`: the copy a scanner in front of the recipient's
    mailbox just fetched the link from (a deferred copy arrives minutes or hours after the
    link was made; a letter's released original, with its download link, days after)."""
    return await db.read(lambda connection: delivered_at(connection, link, now))


async def journal_visit(db: Database, event: NewEvent, at: datetime) -> None:
    """A visit's event, durably, in the next group commit (gateway/store/group_commit.py):
    many visits and messages share one transaction and its fsync, and the visit holds no
    connection of its own while it waits."""
    await group_commit.submit(db, lambda _connection: Done(None, [event], at))


@dataclass(frozen=True)
class _CountDownload:
    """A person's download as a group-commit unit: the counter goes up and its event,
    `download.first` for the 1, is journaled in the same transaction; None (nothing
    written) when the link lost the file since it was found. Units of one batch run one
    after another, so of two first downloads exactly one reads 1."""

    link_id: str
    file_id: str
    data: FileDownload
    message_id: str
    at: datetime

    def __call__(self, connection: Connection) -> Done[NewEvent | None]:
        downloads = connection.execute(
            update(LinkFile)
            .where(LinkFile.link_id == self.link_id, LinkFile.file_id == self.file_id)
            .values(downloads=LinkFile.downloads + 1)
            .returning(LinkFile.downloads)
        ).scalar_one_or_none()
        if downloads is None:
            return Done(None)
        kind = DOWNLOAD_FIRST if downloads == 1 else DOWNLOAD_REPEAT
        event = kind.new(self.data, message_id=self.message_id)
        return Done(event, [event], self.at)


async def _recipient_links(session: AsyncSession, message_id: str, recipient: str) -> list[Link]:
    """Every link `message_id` made for `recipient` (any case of the address), locked."""
    links = (
        await session.scalars(
            select(Link)
            .where(
                Link.message_id == message_id,
                func.lower(Link.recipient) == recipient.strip().lower(),
            )
            .order_by(Link.created_at, Link.id)
            .with_for_update()
        )
    ).all()
    if not links:
        raise UnknownTarget("action.no_recipient_link", message=message_id, recipient=recipient)
    return list(links)


async def _reopen_letter(session: AsyncSession, link: Link) -> None:
    """A letter the sweeper marked expired waits for consent again once its link is valid."""
    letter = await session.scalar(select(Letter).where(Letter.link_id == link.id).with_for_update())
    if letter is not None and letter.status == LetterStatus.EXPIRED:
        letter.status = LetterStatus.HELD


def _visit(found: FoundLink, ip: str, user_agent: str, verdict: Verdict) -> LinkVisit:
    visit: LinkVisit = {
        "link_id": found.link.id,
        "recipient": found.link.recipient,
        "ip": ip,
        "user_agent": user_agent,
    }
    if verdict.automated:
        visit["automated"] = True
        visit["automated_reasons"] = list(verdict.reasons)
    return visit
