"""Housekeeping: expire links whose time is up, delete blobs nobody needs any more.

A blob is needed while a message or a delivery names it, or while a link to a file made of
it is valid or expired for less than the grace period (so an agent can still re-send one).
A blob also lives at least the grace period after it was written: an intake stores blobs
before it commits the rows that name them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, union, update

from gateway import journal
from gateway.blobstore import BlobStore
from gateway.db import Database
from gateway.models import Delivery, Link, LinkFile, Message, StoredFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    links_expired: int
    blobs_deleted: int
    bytes_freed: int


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
                journal.NewEvent(
                    "link.expired",
                    message_id,
                    data={"link_id": link_id, "recipient": recipient, "kind": kind},
                )
                for link_id, message_id, recipient, kind in rows
            ],
            now,
        )
    return len(rows)


async def needed_blobs(db: Database, now: datetime, grace: timedelta) -> set[str]:
    live_link = (Link.expired.is_(False)) | (Link.expires_at > now - grace)
    query = union(
        select(Message.blob),
        select(Delivery.blob),
        select(StoredFile.sha256)
        .join(LinkFile, LinkFile.file_id == StoredFile.id)
        .join(Link, Link.id == LinkFile.link_id)
        .where(live_link),
        select(StoredFile.sha256).where(~StoredFile.id.in_(select(LinkFile.file_id))),
    )
    async with db.transaction() as session:
        return set((await session.scalars(query)).all())


def _delete_unneeded(blobs: BlobStore, needed: set[str], written_before: float) -> tuple[int, int]:
    deleted = freed = 0
    for directory, _, names in os.walk(blobs.root):
        if os.path.basename(directory) == "tmp":
            continue
        for name in names:
            if len(name) != 64 or name in needed:
                continue
            path = os.path.join(directory, name)
            stat = os.stat(path)
            if stat.st_mtime >= written_before:
                continue
            os.unlink(path)
            deleted, freed = deleted + 1, freed + stat.st_size
    return deleted, freed


async def sweep(db: Database, blobs: BlobStore, now: datetime, grace: timedelta) -> SweepReport:
    expired = await expire_links(db, now)
    needed = await needed_blobs(db, now, grace)
    deleted, freed = await asyncio.to_thread(
        _delete_unneeded, blobs, needed, (now - grace).timestamp()
    )
    if deleted:
        async with db.transaction() as session:
            await journal.append(
                session,
                [journal.NewEvent("blobs.deleted", data={"count": deleted, "bytes": freed})],
                now,
            )
    return SweepReport(expired, deleted, freed)


async def run_hourly(
    db: Database,
    blobs: BlobStore,
    clock: Callable[[], datetime],
    grace: timedelta,
    stop: asyncio.Event,
    interval: float = 3600,
) -> None:
    while not stop.is_set():
        try:
            report = await sweep(db, blobs, clock(), grace)
            if report.links_expired or report.blobs_deleted:
                log.info("sweep: %s", report)
        except Exception:
            log.exception("sweep failed; trying again next time")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
