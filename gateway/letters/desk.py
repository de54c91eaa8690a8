"""What the prospect's letter pages and the sweeper ask of registered letters.

Find a letter by its token, record a view, release it on consent, pass on a request for a
new link, and expire the letters whose link ran out. Release happens in one transaction:
consent record, journal, the evidence-stamped original and the agent's confirmation queued
together, exactly once.

What agents do to letters lives here too (the console and the API call it): re-send with a
fresh link, release without consent (never journaled as consent), preview, and read the
consent PDF and the released original for a lawyer. Each takes the actor's name, refuses with
gateway/agent_actions.py's errors before it writes, and shares release's small steps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Connection, and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.agent_actions import UnknownTarget, WrongState, checked_actor, checked_reason
from gateway.config import Settings
from gateway.letters import confirmation, renewal
from gateway.letters.blocks import BlockSet, BlockSets, contracting_company
from gateway.letters.compose import letter_for_held
from gateway.letters.evidence import (
    ConsentRecord,
    ShownBlock,
    evidence_fields,
    released_by_agent_field,
    texts_sha256,
)
from gateway.letters.expiry_notice import ExpiredLetter, expiry_notice_mail
from gateway.links.desk import (
    MAX_DAYS,
    copy_delivered_at,
    journal_visit,
    judge_visit,
)
from gateway.links.tokens import (
    Closed,
    Delivered,
    TokenClosed,
    TokenUnknown,
    delivered_at,
    hash_token,
    letter_url,
    new_link,
    new_token,
)
from gateway.mail import headers
from gateway.mail.own_mail import OwnMail, console_url
from gateway.outbound.local_mail import Queued, enqueue
from gateway.outbound.queue import new_delivery
from gateway.store import journal
from gateway.store.blobs import BlobMissing, BlobStore
from gateway.store.db import Database
from gateway.store.events import (
    CONSENT_GIVEN,
    DELIVERY_QUEUED,
    LETTER_EXPIRED,
    LETTER_RELEASED,
    LETTER_RELEASED_BY_AGENT,
    LETTER_RESENT,
    LETTER_VIEWED,
    LINK_REVOKED,
    LetterVisit,
)
from gateway.store.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Event,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    MessageKind,
    new_id,
)
from gateway.store.raw_sql import RawStatement, loaded
from gateway.texts.refusals import Term
from rules.automated_visits import Verdict

log = logging.getLogger(__name__)
T = TypeVar("T")
EXPIRE_BATCH = 100


class LetterError(Exception):
    """Why a letter cannot be opened or released; the web turns it into a page."""


class LetterUnknown(LetterError, TokenUnknown):
    pass


class LetterExpired(LetterError, TokenClosed):
    """The letter can no longer be opened; `expires_at` is when its link ran out."""

    def __init__(
        self,
        letter: Letter,
        message: Message,
        expires_at: datetime,
        reason: Closed = Closed.EXPIRED,
    ) -> None:
        super().__init__(reason)
        self.letter = letter
        self.message = message
        self.expires_at = expires_at


class ConsentIncomplete(LetterError):
    def __init__(self, missing: list[ShownBlock]) -> None:
        super().__init__("required declarations are missing: " + ", ".join(b.id for b in missing))
        self.missing = missing


@dataclass(frozen=True)
class FoundLetter:
    letter: Letter
    message: Message
    link: Link
    blocks: tuple[ShownBlock, ...]
    consent: Consent | None
    # when the letter's copy was delivered, read with the letter (LetterDesk.find)
    delivered: Delivered | None = None

    @property
    def released(self) -> bool:
        return self.letter.status == LetterStatus.RELEASED


@dataclass(frozen=True)
class LetterPreview:
    """What the letter's page shows (`found`), and why it is closed (None when it opens)."""

    found: FoundLetter
    closed: Closed | None


@dataclass(frozen=True)
class Release:
    consent: Consent
    letter: Letter
    already: bool


@dataclass(frozen=True)
class _Evidence:
    """What a consent records, made before the transaction that records it."""

    record: ConsentRecord
    released_blob: str
    pdf_blob: str
    notice: OwnMail


UNSIGNED_HEADER = "X-Sealrelay-Unsigned-Copy"


@dataclass(frozen=True)
class ReleasedOriginal:
    """A released original for a lawyer. `signed`: the exact bytes the recipient's server
    accepted, DKIM-signed over the evidence headers. Otherwise the copy as queued, with an
    `X-Sealrelay-Unsigned-Copy` field in front saying why (`pending`: not delivered yet)."""

    data: bytes
    signed: bool
    pending: bool


@dataclass(frozen=True)
class _Unsigned:
    pending: bool

    @property
    def reason(self) -> str:
        if self.pending:
            return "not delivered yet; the copy as queued, without the DKIM signature it gets"
        return "delivered before signed copies were kept; the copy as queued, without DKIM"


class LetterDesk:
    """What the prospect's pages ask of letters: find one, record a view, release it, ask
    for a new link; and what the sweeper asks: expire those whose link ran out."""

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
        self.scanners = settings.scanners.rules()
        self._loaded_block_sets: BlockSets | None = None  # loaded when a letter is re-sent

    async def find(self, token: str) -> FoundLetter:
        """The letter behind a token; LetterUnknown or LetterExpired (unless released)."""
        now = self.clock()
        return await self.db.read(lambda connection: _read_letter(connection, token, now))

    async def _find(self, session: AsyncSession, token: str, *, lock: bool) -> FoundLetter:
        if not token or len(token) > 100:
            raise LetterUnknown(token)
        # A letter re-sent with a fresh link keeps the old link (revoked): the old token
        # still finds its letter, by message and recipient, to say that access ended.
        query = (
            select(Letter, Message, Link)
            .join(
                Link,
                and_(Link.message_id == Letter.message_id, Link.recipient == Letter.recipient),
            )
            .join(Message, Message.id == Letter.message_id)
            .where(Link.token_hash == hash_token(token), Link.kind == LinkKind.LETTER)
            .limit(1)
        )
        if lock:
            query = query.with_for_update(of=Letter)
        row = (await session.execute(query)).first()
        if row is None:
            raise LetterUnknown(token)
        letter, message, link = row
        consent = await session.scalar(select(Consent).where(Consent.letter_id == letter.id))
        closed = _closed(letter, link, self.clock())
        if closed is not None:
            # the exception rolls the transaction back, which would expire (blank) the rows
            # it carries; detached first, they stay readable for the page that says so
            session.expunge(letter)
            session.expunge(message)
            raise LetterExpired(letter, message, link.expires_at, closed)
        blocks = tuple(ShownBlock(**block) for block in letter.blocks)
        return FoundLetter(letter, message, link, blocks, consent)

    async def record_view(
        self,
        found: FoundLetter,
        ip: str,
        user_agent: str,
        *,
        method: str = "GET",
        has_cookie: bool = False,
    ) -> Verdict:
        """`letter.viewed`: a GET of the letter's page, which never consents; marked when it
        looks like a link scanner's (rules/automated_visits.py)."""
        now = self.clock()
        if found.delivered is not None:
            delivered = found.delivered.at
        else:
            delivered = await copy_delivered_at(self.db, found.link, now)
        verdict = judge_visit(
            self.scanners, found.link, now, ip, user_agent, method, has_cookie, delivered
        )
        visit: LetterVisit = {
            "letter_id": found.letter.id,
            "recipient": found.letter.recipient,
            "ip": ip,
            "user_agent": user_agent,
        }
        if verdict.automated:
            visit["automated"] = True
            visit["automated_reasons"] = list(verdict.reasons)
        event = LETTER_VIEWED.new(visit, message_id=found.letter.message_id)
        await journal_visit(self.db, event, self.clock())
        return verdict

    async def request_new_link(self, letter: Letter, message: Message, ip: str) -> bool:
        """Ask the agent for a new link for an expired letter (gateway/letters/renewal.py);
        False, with nothing written, when the letter's last request went out less than 24
        hours ago."""
        if not message.sender:
            return False
        async with self.db.transaction() as session:
            sent = await renewal.queue_request(
                session, self.blobs, self.settings, letter, message, ip, self.clock()
            )
        if sent:
            self.notify()
        return sent

    async def release(self, token: str, checked: set[str], ip: str, user_agent: str) -> Release:
        """Consent and release, recorded in one transaction; a second call changes nothing.

        The evidence (the original stamped with the consent, the consent PDF) is made from a
        read of the letter before that transaction begins: on SQLite every write transaction
        holds the one write lock, and mail waits behind it while a PDF is drawn. The
        transaction finds the letter again, locked; one that finds a consent recorded
        meanwhile (a second click) records nothing, and the files made for it are left to
        the sweeper as no row names them."""
        now = self.clock()
        async with self.db.snapshot() as session:
            found = await self._find(session, token, lock=False)
            if found.consent is not None:
                return Release(found.consent, found.letter, already=True)
            missing = [b for b in found.blocks if b.required and b.id not in checked]
            if missing:
                raise ConsentIncomplete(missing)
            sent_at = await _letter_sent_at(session, found.letter)
        evidence = await self._evidence(found, checked, ip, user_agent, sent_at, now)
        record = evidence.record
        async with self.db.transaction() as session:
            found = await self._find(session, token, lock=True)
            if found.consent is not None:
                return Release(found.consent, found.letter, already=True)
            letter, message = found.letter, found.message
            archive = self._archive()
            deliveries = self._copies(
                message, letter.recipient, evidence.released_blob, now, released=True
            )
            consent = Consent(
                id=record.consent_id,
                letter_id=letter.id,
                given_at=now,
                ip=ip,
                user_agent=record.user_agent,
                blocks=[asdict(b) for b in found.blocks],
                checked=sorted(record.checked),
                texts_sha256=letter.texts_sha256,
                letter_sent_at=sent_at,
                pdf_blob=evidence.pdf_blob,
                released_delivery_id=deliveries[0].id,
            )
            _mark_released(letter, now)
            session.add(consent)
            await session.flush()
            session.add_all(deliveries)
            notices = await enqueue(
                session,
                self.blobs,
                self.settings,
                evidence.notice,
                kind=MessageKind.CONFIRMATION,
                user_id=message.user_id,
                now=now,
                copies=archive,
            )
            await journal.append(
                session,
                [
                    CONSENT_GIVEN.new(
                        {
                            "consent_id": consent.id,
                            "letter_id": letter.id,
                            "recipient": letter.recipient,
                            "ip": ip,
                            "user_agent": user_agent[:300],
                            "texts_sha256": letter.texts_sha256,
                            "checked": consent.checked,
                        },
                        message_id=message.id,
                    ),
                    LETTER_RELEASED.new(
                        {"consent_id": consent.id, "recipient": letter.recipient},
                        message_id=message.id,
                        delivery_id=deliveries[0].id,
                    ),
                    *_queued(deliveries),
                    *notices.events,
                ],
                now,
            )
        self.notify()
        log.info(
            "%s: consent=%s to=<%s>, ip=%s, letter=%s, status=released",
            message.id,
            consent.id,
            letter.recipient,
            ip,
            letter.id,
        )
        return Release(consent, letter, already=False)

    async def _evidence(
        self,
        found: FoundLetter,
        checked: set[str],
        ip: str,
        user_agent: str,
        sent_at: datetime,
        now: datetime,
    ) -> _Evidence:
        """The consent's record and its files: the original stamped with the consent's
        fields, the consent PDF, the agent's confirmation."""
        letter, message = found.letter, found.message
        consent_id = new_id()
        record = ConsentRecord(
            consent_id=consent_id,
            recipient=letter.recipient,
            subject=letter.subject,
            agent=message.sender,
            company=contracting_company(self.settings),
            language=letter.language,
            letter_sent_at=sent_at,
            given_at=now,
            ip=ip,
            user_agent=user_agent[:1000],
            blocks=found.blocks,
            checked=frozenset(checked & {b.id for b in found.blocks}),
            texts_sha256=letter.texts_sha256,
        )
        released_blob = await self._stamped(
            letter, evidence_fields(consent_id, now, ip, letter.texts_sha256, sent_at)
        )
        # fpdf2 (with Pillow) costs ~44 MiB resident: only a release pays for it.
        from gateway.letters import consent_pdf

        zone = self.settings.branding.timezone
        # 25 ms of CPU in the built-in fonts, ~270 ms with a TrueType font to shape and
        # subset: off the event loop, which other sessions and prospects share
        pdf = await asyncio.to_thread(
            consent_pdf.render, record, zone, self.settings.letter.pdf_font
        )
        notice = confirmation.confirmation_mail(
            record,
            pdf,
            agent_address=message.sender,
            offer_subject=letter.subject,
            zone=zone,
            language=self.settings.policy.language,
        )
        return _Evidence(record, released_blob, await self.blobs.put(pdf), notice)

    # -- what agents do (the console and the API call these)

    async def release_by_agent(self, letter_id: str, actor: str, reason: str) -> Delivery:
        """Release a held offer without consent, because the agent says so.

        No consent record is made and no `consent.given` journaled: the journal says
        `letter.released_by_agent` with who and why, and the released copy carries
        X-Sealrelay-Released-By-Agent instead of the consent evidence. Returns the delivery
        of the copy to the recipient.
        """
        actor = checked_actor(actor)
        reason = checked_reason(reason, required=True)
        now = self.clock()
        async with self.db.transaction() as session:
            letter, message = await _held_letter(session, letter_id, "release")
            blob = await _stored_or_refused(
                letter, self._stamped(letter, [released_by_agent_field(letter.id, now)])
            )
            deliveries = self._copies(message, letter.recipient, blob, now, released=True)
            _mark_released(letter, now)
            session.add_all(deliveries)
            await journal.append(
                session,
                [
                    LETTER_RELEASED_BY_AGENT.new(
                        {
                            "letter_id": letter.id,
                            "recipient": letter.recipient,
                            "actor": actor,
                            "reason": reason,
                        },
                        message_id=message.id,
                        delivery_id=deliveries[0].id,
                    ),
                    *_queued(deliveries),
                ],
                now,
            )
        self.notify()
        log.info(
            "%s: letter=%s to=<%s>, status=released, by=%s, consent=none",
            message.id,
            letter.id,
            letter.recipient,
            actor,
        )
        return deliveries[0]

    async def resend(self, letter_id: str, actor: str) -> Delivery:
        """Send a held (or expired) letter again with a fresh link; the old link ends.

        The same snapshot of texts goes out (the letter's blocks and button, not today's
        files), composed as the first letter was (compose.letter_for_held), as a copy of the
        agent's message like the first one; the archive gets it too. The link is valid as
        long as the first one was. Returns the delivery to the recipient.
        """
        actor = checked_actor(actor)
        now = self.clock()
        async with self.db.transaction() as session:
            letter, message = await _held_letter(session, letter_id, "resend", expired_ok=True)
            old = await session.scalar(select(Link).where(Link.id == letter.link_id))
            if old is None:  # the foreign key makes this impossible
                raise UnknownTarget("action.letter_without_link", letter=letter_id)
            days = min(max((old.expires_at - old.created_at).days, 1), MAX_DAYS[LinkKind.LETTER])
            token = new_token()
            link, _ = new_link(
                token=token,
                kind=LinkKind.LETTER,
                message_id=message.id,
                recipient=letter.recipient,
                language=letter.language,
                now=now,
                days=days,
            )
            held = await _stored_or_refused(letter, self.blobs.read(letter.held_blob))
            letter_bytes = letter_for_held(
                self.settings,
                self._snapshot_set(letter),
                headers.fields_of(held),
                sender=message.sender,
                recipient=letter.recipient,
                subject=letter.subject,
                language=letter.language,
                url=letter_url(self.settings.server.public_url, token),
                days=days,
                terms_pdf=self._terms(letter.language),
                now=now,
            )
            blob = await self.blobs.put(letter_bytes)
            revoked = old.revoked_at is None
            if revoked:
                old.revoked_at = now
            session.add(link)
            await session.flush()  # the letter refers to its new link
            letter.link_id = link.id
            letter.letter_blob = blob
            letter.status = LetterStatus.HELD
            deliveries = self._copies(message, letter.recipient, blob, now)
            session.add_all(deliveries)
            events: list[journal.NewEvent] = []
            if revoked:
                events.append(
                    LINK_REVOKED.new(
                        {
                            "link_id": old.id,
                            "recipient": old.recipient,
                            "kind": old.kind,
                            "actor": actor,
                            "reason": "letter re-sent with a fresh link",
                        },
                        message_id=message.id,
                    )
                )
            events.append(
                LETTER_RESENT.new(
                    {
                        "letter_id": letter.id,
                        "recipient": letter.recipient,
                        "actor": actor,
                        "link_id": link.id,
                        "previous_link_id": old.id,
                        "expires_at": link.expires_at.isoformat(),
                    },
                    message_id=message.id,
                    delivery_id=deliveries[0].id,
                )
            )
            await journal.append(session, [*events, *_queued(deliveries)], now)
        self.notify()
        log.info(
            "%s: letter=%s to=<%s>, status=resent, link=%s, by=%s",
            message.id,
            letter.id,
            letter.recipient,
            link.id,
            actor,
        )
        return deliveries[0]

    async def preview(self, letter_id: str, actor: str) -> LetterPreview:
        """What the recipient's letter page shows for `letter_id`, for the console: the same
        found state the page renders, and why it is closed if it is. Reads only: no view is
        recorded and nothing here can consent; only the log says who looked."""
        actor = checked_actor(actor)
        async with self.db.transaction() as session:
            row = (
                await session.execute(
                    select(Letter, Message, Link)
                    .join(Link, Link.id == Letter.link_id)
                    .join(Message, Message.id == Letter.message_id)
                    .where(Letter.id == letter_id)
                )
            ).first()
            if row is None:
                raise UnknownTarget("action.no_letter", letter=letter_id)
            letter, message, link = row
            consent = await session.scalar(select(Consent).where(Consent.letter_id == letter.id))
        blocks = tuple(ShownBlock(**block) for block in letter.blocks)
        found = FoundLetter(letter, message, link, blocks, consent)
        log.info("%s: letter=%s previewed by=%s", message.id, letter.id, actor)
        return LetterPreview(found, _closed(letter, link, self.clock()))

    async def consent_pdf(self, letter_id: str, actor: str) -> bytes:
        """The consent record's PDF, as the recipient can download it, for a lawyer; read
        only, the log says who fetched it."""
        actor = checked_actor(actor)
        async with self.db.transaction() as session:
            letter = await session.get(Letter, letter_id)
            if letter is None:
                raise UnknownTarget("action.no_letter", letter=letter_id)
            consent = await session.scalar(select(Consent).where(Consent.letter_id == letter.id))
        if consent is None:
            raise WrongState("action.no_consent", letter=letter_id)
        log.info("%s: letter=%s consent PDF read by=%s", letter.message_id, letter.id, actor)
        return await self.blobs.read(consent.pdf_blob)

    async def released_original(self, letter_id: str, actor: str) -> ReleasedOriginal:
        """The released original as the recipient got it: the DKIM-signed bytes the delivery
        stored (evidence headers, or the agent's release header, signed over). Until it is
        delivered, the copy as queued with an `X-Sealrelay-Unsigned-Copy` field saying so.
        Read only; the log says who fetched it."""
        actor = checked_actor(actor)
        async with self.db.transaction() as session:
            letter = await session.get(Letter, letter_id)
            if letter is None:
                raise UnknownTarget("action.no_letter", letter=letter_id)
            if letter.status != LetterStatus.RELEASED:
                raise WrongState("action.not_released", letter=letter_id)
            delivery_id = await session.scalar(
                select(Consent.released_delivery_id).where(Consent.letter_id == letter.id)
            )
            if delivery_id is None:
                delivery_id = await _released_by_agent_delivery(session, letter)
            delivery = await session.get(Delivery, delivery_id) if delivery_id else None
        if delivery is None:
            raise WrongState("action.released_copy_missing", letter=letter_id)
        signed = delivery.signed_blob is not None
        log.info(
            "%s: letter=%s released original read by=%s signed=%s",
            letter.message_id,
            letter.id,
            actor,
            "yes" if signed else "no",
        )
        if delivery.signed_blob is not None:
            return ReleasedOriginal(await self.blobs.read(delivery.signed_blob), True, False)
        unsigned = _Unsigned(pending=delivery.status != DeliveryStatus.DELIVERED)
        queued = await self.blobs.read(delivery.blob)
        marker = headers.format_field(UNSIGNED_HEADER, unsigned.reason)
        return ReleasedOriginal(marker + queued, False, unsigned.pending)

    def _snapshot_set(self, letter: Letter) -> BlockSet:
        """A block set that shows exactly the letter's snapshot: the configured set whose texts
        hash as the letter's did (for its greeting, intro and outro), or the policy's, with
        the snapshot's blocks and button either way."""
        sets = self._block_sets().sets
        same = [
            block_set
            for (_, language), block_set in sorted(sets.items())
            if language == letter.language and texts_sha256(block_set.blocks) == letter.texts_sha256
        ]
        base = (
            same[0]
            if same
            else sets[(self.settings.policy.letter_block_set or "default", letter.language)]
        )
        blocks = tuple(ShownBlock(**block) for block in letter.blocks)
        return replace(base, blocks=blocks, button=letter.button)

    def _block_sets(self) -> BlockSets:
        if self._loaded_block_sets is None:
            self._loaded_block_sets = BlockSets(self.settings)
        return self._loaded_block_sets

    def _terms(self, language: str) -> bytes | None:
        path = self.settings.letter.terms_pdf.get(language)
        return path.read_bytes() if path is not None else None

    # -- what release, release_by_agent and resend share

    def _archive(self) -> list[str]:
        return [self.settings.letter.archive_bcc] if self.settings.letter.archive_bcc else []

    def _copies(
        self,
        message: Message,
        recipient: str,
        blob: str,
        now: datetime,
        *,
        released: bool = False,
    ) -> list[Delivery]:
        """One delivery of `blob` to `recipient` and one to the archive, the recipient's first:
        the consent and the journal name that one. A `released` original keeps the signed
        bytes it is delivered as: that is the copy a lawyer needs (released_original)."""
        lifetime = self.settings.upstream.queue_lifetime
        return [
            new_delivery(message.id, to, blob, now, lifetime, keep_signed=released)
            for to in (recipient, *self._archive())
        ]

    async def _stamped(self, letter: Letter, fields: list[bytes]) -> str:
        """The held original with `fields` in front, stored; its digest."""
        held = await self.blobs.read(letter.held_blob)
        return await self.blobs.put(b"".join(fields) + held)

    async def expire_due(self, now: datetime) -> int:
        """Mark held letters whose link ran out as expired, each once, and tell the agent.
        A letter whose link was revoked is left alone: revoked is what it is.

        Rows another transaction holds (a release under way) are skipped: the next round
        sees them released or still due.
        """
        total = 0
        while True:
            expired = await self._expire_batch(now)
            total += expired
            if expired < EXPIRE_BATCH:
                break
        if total:
            self.notify()
        return total

    async def _expire_batch(self, now: datetime) -> int:
        async with self.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Letter, Message, Link)
                    .join(Link, Link.id == Letter.link_id)
                    .join(Message, Message.id == Letter.message_id)
                    # a revoked link ended the letter already: it stays revoked, and the
                    # agent who revoked it is not told that it expired
                    .where(
                        Letter.status == LetterStatus.HELD,
                        Link.expires_at <= now,
                        Link.revoked_at.is_(None),
                    )
                    .order_by(Link.expires_at)
                    .limit(EXPIRE_BATCH)
                    .with_for_update(of=Letter, skip_locked=True)
                )
            ).all()
            events: list[journal.NewEvent] = []
            for letter, message, link in rows:
                letter.status = LetterStatus.EXPIRED
                notice = await self._queue_expiry_notice(session, letter, message, link, now)
                events.append(
                    LETTER_EXPIRED.new(
                        {
                            "letter_id": letter.id,
                            "recipient": letter.recipient,
                            "expired_at": link.expires_at.isoformat(),
                            "notice_message_id": notice.message.id if notice else None,
                        },
                        message_id=message.id,
                    )
                )
                events.extend(notice.events if notice else [])
            await journal.append(session, events, now)
        return len(rows)

    async def _queue_expiry_notice(
        self, session: AsyncSession, letter: Letter, message: Message, link: Link, now: datetime
    ) -> Queued | None:
        """The notice, queued in `session`; None when no notice is to go."""
        if not self.settings.letter.expired_notice or not message.sender:
            return None
        notice = expiry_notice_mail(
            ExpiredLetter(
                letter_id=letter.id,
                recipient=letter.recipient,
                offer_subject=letter.subject,
                letter_sent=letter.created_at,
                expired=link.expires_at,
            ),
            agent_address=message.sender,
            console=console_url(self.settings.server.public_url, message.id),
            language=self.settings.policy.language,
            zone=self.settings.branding.timezone,
        )
        return await enqueue(
            session,
            self.blobs,
            self.settings,
            notice,
            kind=MessageKind.CONFIRMATION,
            user_id=message.user_id,
            now=now,
        )


def _read_letter(connection: Connection, token: str, now: datetime) -> FoundLetter:
    """`LetterDesk._find` without a lock, as raw statements in a read transaction
    (`Database.read`), with when the letter's copy was delivered: a visit's whole lookup in
    one call, its rows plain objects as a session loads them."""
    if not token or len(token) > 100:
        raise LetterUnknown(token)
    rows = _letter_by_token().rows(connection, {"token_hash": hash_token(token)})
    if not rows:
        raise LetterUnknown(token)
    letter_end = len(_LETTER)
    message_end = letter_end + len(_MESSAGE)
    letter = _LETTER.load(rows[0][:letter_end])
    message = _MESSAGE.load(rows[0][letter_end:message_end])
    link = _LINK.load(rows[0][message_end:])
    consents = _consent_of().rows(connection, {"letter_id": letter.id})
    consent = _CONSENT.load(consents[0]) if consents else None
    closed = _closed(letter, link, now)
    if closed is not None:
        raise LetterExpired(letter, message, link.expires_at, closed)
    blocks = tuple(ShownBlock(**block) for block in letter.blocks)
    at = delivered_at(connection, link, now)
    return FoundLetter(letter, message, link, blocks, consent, Delivered(at))


_LETTER = loaded(Letter)
_MESSAGE = loaded(Message)
_LINK = loaded(Link)
_CONSENT = loaded(Consent)


@functools.cache
def _letter_by_token() -> RawStatement:
    """The query of `LetterDesk._find`, built once."""
    return RawStatement(
        select(*_LETTER.columns, *_MESSAGE.columns, *_LINK.columns)
        .select_from(Letter.__table__)
        .join(
            Link.__table__,
            and_(Link.message_id == Letter.message_id, Link.recipient == Letter.recipient),
        )
        .join(Message.__table__, Message.id == Letter.message_id)
        .where(Link.token_hash == bindparam("token_hash"), Link.kind == LinkKind.LETTER)
        .limit(1)
    )


@functools.cache
def _consent_of() -> RawStatement:
    return RawStatement(
        select(*_CONSENT.columns).where(Consent.letter_id == bindparam("letter_id"))
    )


def _closed(letter: Letter, link: Link, now: datetime) -> Closed | None:
    """Why the letter's page no longer opens for this link, if it does not: revoked (the old
    link of a re-sent letter, or an agent's ending) before expired; a released letter's own
    link does not expire."""
    if link.revoked_at is not None or link.id != letter.link_id:
        return Closed.REVOKED
    # An instance whose clock runs behind still honours an expiry another one recorded.
    expired = link.expired or link.expires_at <= now or letter.status == LetterStatus.EXPIRED
    if expired and letter.status != LetterStatus.RELEASED:
        return Closed.EXPIRED
    return None


async def _held_letter(
    session: AsyncSession, letter_id: str, action: str, *, expired_ok: bool = False
) -> tuple[Letter, Message]:
    """The letter, locked, with its message; UnknownTarget or WrongState unless it is held."""
    row = (
        await session.execute(
            select(Letter, Message)
            .join(Message, Message.id == Letter.message_id)
            .where(Letter.id == letter_id)
            .with_for_update(of=Letter)
        )
    ).first()
    if row is None:
        raise UnknownTarget("action.no_letter", letter=letter_id)
    letter, message = row
    allowed = {LetterStatus.HELD, LetterStatus.EXPIRED} if expired_ok else {LetterStatus.HELD}
    if letter.status not in allowed:
        raise WrongState(
            f"action.not_held_{action}",
            letter=letter_id,
            status=Term(f"work.state.{letter.status}"),
        )
    return letter, message


async def _letter_sent_at(session: AsyncSession, letter: Letter) -> datetime:
    """When the letter reached the recipient's server, or when it was made if not yet."""
    sent = await session.scalar(
        select(Delivery).where(
            Delivery.message_id == letter.message_id,
            Delivery.recipient == letter.recipient,
            Delivery.blob == letter.letter_blob,
        )
    )
    if sent is not None and sent.status == DeliveryStatus.DELIVERED:
        return sent.updated_at
    return letter.created_at


async def _released_by_agent_delivery(session: AsyncSession, letter: Letter) -> str | None:
    events = await session.scalars(
        select(Event)
        .where(
            Event.type == LETTER_RELEASED_BY_AGENT.name,
            Event.message_id == letter.message_id,
        )
        .order_by(Event.id.desc())
    )
    return next((e.delivery_id for e in events if e.data.get("letter_id") == letter.id), None)


async def _stored_or_refused(letter: Letter, reading: Awaitable[T]) -> T:
    """What `reading` reads of the letter's held original; WrongState when the store lost it
    (the transaction then rolls back: nothing is written)."""
    try:
        return await reading
    except BlobMissing as missing:
        raise WrongState("action.original_gone", letter=letter.id, blob=missing.digest) from missing


def _mark_released(letter: Letter, now: datetime) -> None:
    letter.status = LetterStatus.RELEASED
    letter.released_at = now


def _queued(deliveries: list[Delivery]) -> list[journal.NewEvent]:
    return [
        DELIVERY_QUEUED.new({"recipient": d.recipient}, message_id=d.message_id, delivery_id=d.id)
        for d in deliveries
    ]
