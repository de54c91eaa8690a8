"""Waiting for the queue to finish, instead of sleeping for "nothing more happens".

A copy that was wrongly queued is a delivery row before the request that queued it returns;
once every row has reached a final state, whatever was going to arrive has arrived.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus


async def pending(db: Database) -> int:
    async with db.transaction() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.status == DeliveryStatus.QUEUED)
        )
    return int(count or 0)


async def queue_idle(db: Database, timeout: float = 30) -> None:
    """Return once no delivery is waiting or in flight (bounded by `timeout`)."""
    async with asyncio.timeout(timeout):
        while await pending(db):
            await asyncio.sleep(0.05)
