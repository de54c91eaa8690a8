"""Every column that names a blob, and what keeps the blob it names.

The sweeper deletes exactly the blobs that no declared column keeps, so this is the one
place that says which blobs are still needed. A column that names a blob and is missing
here loses its files after the grace period: tests/letters/test_evidence_retention.py fails for any
digest-sized column that is neither declared here nor listed as a hash of something else.

Evidence (the letter as sent, the held original, the released original as signed and
delivered, the consent PDF; the texts shown live in the rows themselves) is kept for
`[letter] evidence_retention` years counted from the end of the year in which the consent was
given or the letter's link expired, as limitation periods run (§§ 195, 199 BGB) and the
shipped privacy text says. The link sweep never touches it.

Everything else follows data minimisation (DESIGN.md): a message's original and its copies
are kept while a copy waits to leave (or is held), while a letter of it is evidence, and for
`[storage] keep_originals_days` after it was received; then they go, and the message's rows
and journal events stay. Linked files live as long as their links plus the grace period; the
links' pages name the agent as the intake kept it (`Message.sender_name`), so they need no
original, except for a message stored before revision 0016, whose original stays while a
link of it is valid or expired less than the grace period ago. Postfix keeps a
message no longer than its delivery; a relay that kept every attachment of every mail for
ever would hold the brokerage's whole correspondence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import CompoundSelect, Select, Subquery, func, select, union
from sqlalchemy.orm import InstrumentedAttribute

from gateway.store.models import (
    ApiKey,
    Consent,
    ConsoleSession,
    Delivery,
    DeliveryStatus,
    Event,
    InlineBlob,
    JournalHead,
    Letter,
    Link,
    LinkFile,
    Message,
    StoredFile,
)

Query = Select[Any]


@dataclass(frozen=True)
class Horizon:
    """What "still needed" means at one moment."""

    now: datetime
    link_grace: timedelta
    evidence_years: int
    originals: timedelta | None = None  # how long a message's original is kept; None: always

    @property
    def evidence_since(self) -> datetime:
        """Evidence whose consent or expiry is at or after this is kept.

        Kept until the end of the year `evidence_years` after the year it arose; a day
        earlier, so that no time zone's new year ends it before the last day.
        """
        start = datetime(self.now.year - self.evidence_years, 1, 1, tzinfo=UTC)
        return start - timedelta(days=1)


@dataclass(frozen=True)
class BlobColumn:
    column: InstrumentedAttribute[str] | InstrumentedAttribute[str | None]
    kept: str  # for people: how long a blob named here lives
    needed: Callable[[Horizon], Query]


def _live_link(horizon: Horizon) -> Any:
    """A link that is valid, or expired less than the grace period ago."""
    return Link.expired.is_(False) | (Link.expires_at > horizon.now - horizon.link_grace)


def _linked_file(horizon: Horizon) -> Query:
    live = _live_link(horizon)
    linked = select(LinkFile.file_id)
    linked_live = linked.join(Link, Link.id == LinkFile.link_id).where(live)
    return select(StoredFile.sha256).where(
        StoredFile.id.in_(linked_live) | ~StoredFile.id.in_(linked)
    )


def _letter_evidence(
    column: InstrumentedAttribute[str],
) -> Callable[[Horizon], Query]:
    def needed(horizon: Horizon) -> Query:
        arose = func.coalesce(Consent.given_at, Link.expires_at)
        return (
            select(column)
            .join(Link, Link.id == Letter.link_id)
            .outerjoin(Consent, Consent.letter_id == Letter.id)
            .where(arose >= horizon.evidence_since)
        )

    return needed


def _signed_release(horizon: Horizon) -> Query:
    """The signed copy of a released original lives as its letter's evidence does."""
    arose = func.coalesce(Consent.given_at, Link.expires_at)
    return (
        select(Delivery.signed_blob)
        .join(Letter, Letter.message_id == Delivery.message_id)
        .join(Link, Link.id == Letter.link_id)
        .outerjoin(Consent, Consent.letter_id == Letter.id)
        .where(Delivery.signed_blob.is_not(None), arose >= horizon.evidence_since)
    )


def _kept_messages(horizon: Horizon) -> Subquery | None:
    """The messages whose original and copies are still kept; None: every message."""
    if horizon.originals is None:
        return None
    return union(
        select(Message.id).where(Message.received_at >= horizon.now - horizon.originals),
        select(Delivery.message_id).where(Delivery.status == DeliveryStatus.QUEUED),
        # pages read the agent's name from these originals while their links live
        select(Link.message_id)
        .join(Message, Message.id == Link.message_id)
        .where(_live_link(horizon) & Message.sender_name.is_(None)),
        _letter_evidence(Letter.message_id)(horizon),
    ).subquery()


def _of_kept_messages(
    column: InstrumentedAttribute[str], message_id: InstrumentedAttribute[str]
) -> Callable[[Horizon], Query]:
    def needed(horizon: Horizon) -> Query:
        kept = _kept_messages(horizon)
        if kept is None:
            return select(column)
        return select(column).where(message_id.in_(select(kept.c[0])))

    return needed


def _consent_pdf(horizon: Horizon) -> Query:
    return select(Consent.pdf_blob).where(Consent.given_at >= horizon.evidence_since)


BLOB_COLUMNS: tuple[BlobColumn, ...] = (
    BlobColumn(
        Message.blob,
        "while a copy waits or a letter is evidence, and keep_originals_days (a message"
        " stored before revision 0016: also while a link of it lives)",
        _of_kept_messages(Message.blob, Message.id),
    ),
    BlobColumn(
        Delivery.blob,
        "as its message's original (a released original is one: evidence for the retention)",
        _of_kept_messages(Delivery.blob, Delivery.message_id),
    ),
    BlobColumn(
        StoredFile.sha256,
        "while a link to it is valid or expired less than the grace period ago",
        _linked_file,
    ),
    BlobColumn(
        Letter.letter_blob,
        "evidence: the retention after consent or expiry",
        _letter_evidence(Letter.letter_blob),
    ),
    BlobColumn(
        Letter.held_blob,
        "until released or expired, then evidence for the retention",
        _letter_evidence(Letter.held_blob),
    ),
    BlobColumn(Consent.pdf_blob, "evidence: the retention after consent", _consent_pdf),
    BlobColumn(
        Delivery.signed_blob,
        "evidence: the released original as signed and delivered; the retention after"
        " consent or expiry",
        _signed_release,
    ),
)

# Columns that hold blobs themselves, keyed by their digest: the sweeper takes them as it
# takes files (gateway/store/inline_blobs.py), by what the columns above keep.
BLOBS_HELD: tuple[InstrumentedAttribute[str], ...] = (InlineBlob.digest,)

# Digest-sized columns that hash something else and name no blob.
HASHES_NAMING_NO_BLOB: tuple[
    InstrumentedAttribute[str] | InstrumentedAttribute[str | None], ...
] = (
    Event.hash,
    Event.prev_hash,
    JournalHead.hash,
    Link.token_hash,
    Letter.texts_sha256,
    Consent.texts_sha256,
    ApiKey.key_hash,
    ConsoleSession.id,
)


def needed(horizon: Horizon) -> CompoundSelect[Any]:
    """One query for every blob some declared column still keeps."""
    return union(*(column.needed(horizon) for column in BLOB_COLUMNS))
