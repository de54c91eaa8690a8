"""What /healthz and /metrics ask of the database, so the web holds no SQL."""

from __future__ import annotations

from sqlalchemy import func, select, text

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus


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
