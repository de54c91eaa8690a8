"""Pruning the webhook delivery history, so `webhook_deliveries` stops growing with every event.

Only finished rows go (delivered, or failed for good) once their last attempt is older than
`KEEP_FINISHED`; queued rows stay whatever their age. The events themselves are the journal's
and are never touched, so a range replay can send a pruned event again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select

from gateway.store.db import Database
from gateway.store.models import WebhookDelivery, WebhookDeliveryStatus, WebhookEndpoint
from gateway.webhooks.tunables import KEEP_FINISHED, PRUNE_BATCH

_FINISHED = (WebhookDeliveryStatus.DELIVERED, WebhookDeliveryStatus.FAILED)


async def prune_finished(
    db: Database,
    now: datetime,
    keep: timedelta = KEEP_FINISHED,
    batch: int = PRUNE_BATCH,
) -> int:
    """Delete finished deliveries older than `keep`, per endpoint and status so that each
    batch reads the (endpoint, status, updated_at) index; returns how many went."""
    cutoff = now - keep
    async with db.transaction() as session:
        endpoints = list((await session.scalars(select(WebhookEndpoint.id))).all())
    deleted = 0
    for endpoint_id in endpoints:
        for status in _FINISHED:
            while True:
                old = (
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.endpoint_id == endpoint_id,
                        WebhookDelivery.status == status,
                        WebhookDelivery.updated_at < cutoff,
                    )
                    .limit(batch)
                )
                async with db.transaction() as session:
                    ids = list((await session.scalars(old)).all())
                    if ids:
                        await session.execute(
                            delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)),
                            execution_options={"synchronize_session": False},
                        )
                deleted += len(ids)
                if len(ids) < batch:
                    break
    return deleted
