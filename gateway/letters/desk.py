"""What the prospect's letter pages and the sweeper ask of registered letters.

Find a letter by its token, record a view, release it on consent, pass on a request for a
new link, and expire the letters whose link ran out. Release happens in one transaction:
consent record, journal, the evidence-stamped original and the agent's confirmation queued
together, exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.letters import confirmation, renewal
from gateway.letters.evidence import ConsentRecord, ShownBlock, evidence_fields
from gateway.letters.expiry_notice import ExpiredLetter, expiry_notice_mail
from gateway.links.tokens import Closed, TokenClosed, TokenUnknown, hash_token
from gateway.outbound.local_mail import Queued, enqueue
from gateway.outbound.queue import new_delivery
from gateway.store import journal
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.events import (
    CONSENT_GIVEN,
    DELIVERY_QUEUED,
    LETTER_EXPIRED,
    LETTER_RELEASED,
    LETTER_VIEWED,
)
from gateway.store.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    MessageKind,
    new_id,
)

log = logging.getLogger(__name__)
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

    @property
    def released(self) -> bool:
        return self.letter.status == LetterStatus.RELEASED


@dataclass(frozen=True)
class Release:
    consent: Consent
    letter: Letter
    already: bool


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

    async def find(self, token: str) -> FoundLetter:
        """The letter behind a token; LetterUnknown or LetterExpired (unless released)."""
        async with self.db.transaction() as session:
            found = await self._find(session, token, lock=False)
        return found

    async def _find(self, session: AsyncSession, token: str, *, lock: bool) -> FoundLetter:
        if not token or len(token) > 100:
            raise LetterUnknown(token)
        query = (
            select(Letter, Message, Link)
            .join(Link, Link.id == Letter.link_id)
            .join(Message, Message.id == Letter.message_id)
            .where(Link.token_hash == hash_token(token), Link.kind == LinkKind.LETTER)
        )
        if lock:
            query = query.with_for_update(of=Letter)
        row = (await session.execute(query)).first()
        if row is None:
            raise LetterUnknown(token)
        letter, message, link = row
        consent = await session.scalar(select(Consent).where(Consent.letter_id == letter.id))
        # An instance whose clock runs behind still honours an expiry another one recorded.
        expired = (
            link.expired or link.expires_at <= self.clock() or letter.status == LetterStatus.EXPIRED
        )
        if expired and letter.status != LetterStatus.RELEASED:
            # the exception rolls the transaction back, which would expire (blank) the rows
            # it carries; detached first, they stay readable for the page that says "expired"
            session.expunge(letter)
            session.expunge(message)
            raise LetterExpired(letter, message, link.expires_at)
        blocks = tuple(ShownBlock(**block) for block in letter.blocks)
        return FoundLetter(letter, message, link, blocks, consent)

    async def record_view(self, found: FoundLetter, ip: str, user_agent: str) -> None:
        """`letter.viewed`: a GET of the letter's page, which never consents."""
        event = LETTER_VIEWED.new(
            {
                "letter_id": found.letter.id,
                "recipient": found.letter.recipient,
                "ip": ip,
                "user_agent": user_agent,
            },
            message_id=found.letter.message_id,
        )
        async with self.db.transaction() as session:
            await journal.append(session, [event], self.clock())

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
        """Consent and release in one transaction; a second call changes nothing."""
        now = self.clock()
        async with self.db.transaction() as session:
            found = await self._find(session, token, lock=True)
            if found.consent is not None:
                return Release(found.consent, found.letter, already=True)
            missing = [b for b in found.blocks if b.required and b.id not in checked]
            if missing:
                raise ConsentIncomplete(missing)
            letter, message = found.letter, found.message
            sent = await session.scalar(
                select(Delivery).where(
                    Delivery.message_id == message.id,
                    Delivery.recipient == letter.recipient,
                    Delivery.blob == letter.letter_blob,
                )
            )
            sent_at = (
                sent.updated_at
                if sent is not None and sent.status == DeliveryStatus.DELIVERED
                else letter.created_at
            )
            consent_id = new_id()
            ticked = sorted(checked & {b.id for b in found.blocks})
            record = ConsentRecord(
                consent_id=consent_id,
                recipient=letter.recipient,
                subject=letter.subject,
                agent=message.sender,
                company=self.settings.branding.company_name,
                language=letter.language,
                letter_sent_at=sent_at,
                given_at=now,
                ip=ip,
                user_agent=user_agent[:1000],
                blocks=found.blocks,
                checked=frozenset(ticked),
                texts_sha256=letter.texts_sha256,
            )
            held = await self.blobs.read(letter.held_blob)
            released = (
                b"".join(evidence_fields(consent_id, now, ip, letter.texts_sha256, sent_at)) + held
            )
            released_blob = await self.blobs.put(released)
            # fpdf2 (with Pillow) costs ~44 MiB resident: only a release pays for it.
            from gateway.letters import consent_pdf

            zone = self.settings.branding.timezone
            pdf = consent_pdf.render(record, zone)
            pdf_blob = await self.blobs.put(pdf)
            notice = confirmation.confirmation_mail(
                record,
                pdf,
                agent_address=message.sender,
                offer_subject=letter.subject,
                zone=zone,
                language=self.settings.policy.language,
            )
            lifetime = self.settings.upstream.queue_lifetime
            archive = [self.settings.letter.archive_bcc] if self.settings.letter.archive_bcc else []
            # The released original first: the consent and the journal name that delivery.
            deliveries = [
                new_delivery(message.id, recipient, released_blob, now, lifetime)
                for recipient in (letter.recipient, *archive)
            ]
            consent = Consent(
                id=consent_id,
                letter_id=letter.id,
                given_at=now,
                ip=ip,
                user_agent=user_agent[:1000],
                blocks=[asdict(b) for b in found.blocks],
                checked=ticked,
                texts_sha256=letter.texts_sha256,
                letter_sent_at=sent_at,
                pdf_blob=pdf_blob,
                released_delivery_id=deliveries[0].id,
            )
            letter.status = LetterStatus.RELEASED
            letter.released_at = now
            session.add(consent)
            await session.flush()
            session.add_all(deliveries)
            notices = await enqueue(
                session,
                self.blobs,
                self.settings,
                notice,
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
                            "consent_id": consent_id,
                            "letter_id": letter.id,
                            "recipient": letter.recipient,
                            "ip": ip,
                            "user_agent": user_agent[:300],
                            "texts_sha256": letter.texts_sha256,
                            "checked": ticked,
                        },
                        message_id=message.id,
                    ),
                    LETTER_RELEASED.new(
                        {"consent_id": consent_id, "recipient": letter.recipient},
                        message_id=message.id,
                        delivery_id=deliveries[0].id,
                    ),
                    *(
                        DELIVERY_QUEUED.new(
                            {"recipient": d.recipient}, message_id=d.message_id, delivery_id=d.id
                        )
                        for d in deliveries
                    ),
                    *notices.events,
                ],
                now,
            )
        self.notify()
        log.info(
            "%s: consent=%s to=<%s>, ip=%s, letter=%s, status=released",
            message.id,
            consent_id,
            letter.recipient,
            ip,
            letter.id,
        )
        return Release(consent, letter, already=False)

    async def expire_due(self, now: datetime) -> int:
        """Mark held letters whose link ran out as expired, each once, and tell the agent.

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
                    .where(Letter.status == LetterStatus.HELD, Link.expires_at <= now)
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
