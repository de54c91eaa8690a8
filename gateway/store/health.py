"""What /healthz and /metrics ask of the database, so the web holds no SQL; whether the blob
store answers (BlobHealth)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import func, select, text

from gateway.store import journal
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.db import Database
from gateway.store.metrics import BLOB_STORE_AVAILABLE
from gateway.store.models import Delivery, DeliveryStatus

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 20.0  # seconds a check may take before the store counts as unavailable
RECHECK_FIRST = 1.0  # seconds before the first check again once the store failed
RECHECK_MAX = 30.0  # the longest wait between checks while it fails (and while it answers)


async def database_answers(db: Database) -> None:
    """Returns when the database answers a trivial query; raises whatever reaching it raised."""
    async with db.transaction() as session:
        await session.execute(text("SELECT 1"))


async def journal_lag(db: Database) -> journal.Lag:
    """The journal's events not chained yet (gateway/store/sequencer.py), a read only."""
    async with db.snapshot() as session:
        return await journal.lag(session)


async def queue_depths(db: Database) -> dict[str, int]:
    """Deliveries per status, every status named (0 when it has none)."""
    async with db.transaction() as session:
        rows = await session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        )
        counts = {status: count for status, count in rows}
    return {status.value: counts.get(status.value, 0) for status in DeliveryStatus}


class BlobHealth:
    """Whether the blob store answered its last check, kept up to date by `run`.

    A relay whose bucket cannot be reached at start still starts, degraded: /healthz and
    /metrics say so, SMTP intake answers 451 before the client sends its data, and the
    check is made again after 1, 2, 4 … seconds, at most RECHECK_MAX apart, until the
    store answers; then the relay is whole again without a restart. Checks go on every
    RECHECK_MAX while it answers, so an outage shows on /healthz within that time even when
    no mail comes (a put that fails at SMTP intake says so at once, through `failed`).
    """

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.problem: str | None = None
        self._changed = asyncio.Event()
        BLOB_STORE_AVAILABLE.set(1)

    @property
    def available(self) -> bool:
        return self.problem is None

    async def check(self) -> bool:
        """Ask the store now; whether it answered."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self.blobs.check()
        except StoreUnavailable as exc:
            self.failed(exc)
        except TimeoutError:
            self.failed(StoreUnavailable(f"no answer within {CHECK_TIMEOUT:g} s"))
        else:
            if self.problem is not None:
                log.warning("blob store available again; the relay is whole")
            self.problem = None
            BLOB_STORE_AVAILABLE.set(1)
        return self.available

    def failed(self, exc: StoreUnavailable) -> None:
        """The store failed a put, a read or a check: degraded until a check passes."""
        if self.problem is None:
            log.warning("blob store unavailable, the relay is degraded: %s", exc)
            self._changed.set()
        self.problem = str(exc)
        BLOB_STORE_AVAILABLE.set(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Check until `stop`: backing off while the store fails, at RECHECK_MAX while not."""
        wait = RECHECK_FIRST
        while not stop.is_set():
            if await self.check():
                wait = RECHECK_FIRST
                pause = RECHECK_MAX
            else:
                pause, wait = wait, min(wait * 2, RECHECK_MAX)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await _first(stop, self._changed)


async def _first(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
