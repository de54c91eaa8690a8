"""Housekeeping: expire links and letters whose time is up, delete blobs nobody needs.

Which blobs are needed is declared once, per column, in gateway/store/blob_columns.py: messages
and deliveries keep theirs, a linked file lives while its link is valid or expired for less
than the grace period, evidence for its retention. A blob also lives at least the grace
period after it was written: an intake stores blobs before it commits the rows that name
them.

Between listing a blob and deleting it, an intake may put the same bytes again (making it
young) and commit rows naming it; the listing's age and the needed set read before it are
then stale. So a blob the listing condemns is judged again right before it goes: its digest
is looked up in the declared columns once more (rows committed since the first look keep
it), and the store deletes it only if its age at that moment is still past the grace period
(`BlobStore.delete_stale`; a put refreshes the age of bytes already stored, so a put after
the listing spares the blob). The local store makes that last check and the delete one
step; S3 cannot, and leaves one round trip between them, which a put must hit exactly for
bytes nothing named for the whole grace period. Small blobs kept in the database
(gateway/store/inline_blobs.py) are listed with the files and go by one DELETE that checks
the age itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from gateway.store import journal
from gateway.store.blob_columns import Horizon
from gateway.store.blob_columns import needed as needed_query
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.db import Database
from gateway.store.events import BLOBS_DELETED, LINK_EXPIRED
from gateway.store.models import Link

log = logging.getLogger(__name__)

EVIDENCE_YEARS = 3
RECHECK_BATCH = 500  # condemned blobs looked up again in one query, just before they go
# Marks held letters whose link ran out as expired and tells their agents; the count.
ExpireLetters = Callable[[datetime], Awaitable[int]]


@dataclass(frozen=True)
class SweepReport:
    links_expired: int
    blobs_deleted: int
    bytes_freed: int
    letters_expired: int = 0


async def expire_links(db: Database, now: datetime) -> int:
    async with db.transaction() as session:
        rows = (
            await session.execute(
                update(Link)
                .where(Link.expired.is_(False), Link.expires_at <= now)
                .values(expired=True)
                .returning(Link.id, Link.message_id, Link.recipient, Link.kind),
                execution_options={"synchronize_session": False},
            )
        ).all()
        await journal.append(
            session,
            [
                LINK_EXPIRED.new(
                    {"link_id": link_id, "recipient": recipient, "kind": kind},
                    message_id=message_id,
                )
                for link_id, message_id, recipient, kind in rows
            ],
            now,
        )
    return len(rows)


async def needed_blobs(db: Database, horizon: Horizon) -> set[str]:
    query = needed_query(horizon)
    async with db.transaction() as session:
        return set((await session.scalars(query)).all())


async def still_needed(db: Database, horizon: Horizon, digests: Sequence[str]) -> set[str]:
    """Which of `digests` the declared columns keep now."""
    kept = needed_query(horizon).subquery()
    column = next(iter(kept.c))
    async with db.transaction() as session:
        found = await session.scalars(select(column).where(column.in_(digests)))
        return set(found.all())


async def _delete_unneeded(
    db: Database, blobs: BlobStore, horizon: Horizon, needed: set[str], written_before: datetime
) -> tuple[int, int]:
    condemned = [
        blob.digest
        async for blob in blobs.list()
        if blob.digest not in needed and blob.written_at < written_before
    ]
    deleted = freed = 0
    for start in range(0, len(condemned), RECHECK_BATCH):
        batch = condemned[start : start + RECHECK_BATCH]
        kept = await still_needed(db, horizon, batch)
        for digest in batch:
            if digest in kept:
                continue
            size = await blobs.delete_stale(digest, written_before)
            if size is not None:
                deleted, freed = deleted + 1, freed + size
    return deleted, freed


async def sweep(
    db: Database,
    blobs: BlobStore,
    now: datetime,
    grace: timedelta,
    *,
    evidence_years: int = EVIDENCE_YEARS,
    originals: timedelta | None = None,
    expire_letters: ExpireLetters | None = None,
) -> SweepReport:
    """`originals`: how long after its receipt a message's original is kept at least
    (longer while a copy waits or it is evidence, gateway/store/blob_columns.py); None
    keeps originals for ever."""
    expired = await expire_links(db, now)
    letters = await expire_letters(now) if expire_letters is not None else 0
    horizon = Horizon(now, grace, evidence_years, originals)
    needed = await needed_blobs(db, horizon)
    deleted, freed = await _delete_unneeded(db, blobs, horizon, needed, now - grace)
    if deleted:
        async with db.transaction() as session:
            await journal.append(
                session,
                [BLOBS_DELETED.new({"count": deleted, "bytes": freed})],
                now,
            )
    await blobs.remove_interrupted_writes()  # a killed writer's leftovers (S3: parts)
    return SweepReport(expired, deleted, freed, letters)


async def run_hourly(
    sweep_once: Callable[[], Awaitable[SweepReport]],
    stop: asyncio.Event,
    interval: float = 3600,
) -> None:
    while not stop.is_set():
        try:
            report = await sweep_once()
            if report.links_expired or report.blobs_deleted or report.letters_expired:
                log.info("sweep: %s", report)
        except StoreUnavailable as exc:
            log.warning("sweep put off, blob store unavailable: %s", exc)
        except Exception:
            log.exception("sweep failed; trying again next time")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
