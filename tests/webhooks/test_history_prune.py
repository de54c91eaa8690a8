"""The sweep prunes finished webhook deliveries past their keep time, and only those."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import (
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    utcnow,
)
from gateway.webhooks.history import prune_finished


async def test_only_finished_deliveries_older_than_the_keep_time_go(database: Database) -> None:
    now = utcnow()
    old, recent = now - timedelta(days=31), now - timedelta(days=29)
    rows = {
        "old-delivered": (WebhookDeliveryStatus.DELIVERED, old),
        "old-failed": (WebhookDeliveryStatus.FAILED, old),
        "old-queued": (WebhookDeliveryStatus.QUEUED, old),
        "recent-delivered": (WebhookDeliveryStatus.DELIVERED, recent),
        "recent-failed": (WebhookDeliveryStatus.FAILED, recent),
    }
    async with database.transaction() as session:
        for number, endpoint_id in enumerate(("ep-one", "ep-two")):
            session.add(WebhookEndpoint(id=endpoint_id, url="https://crm.example/", secret="s"))
            await session.flush()
            for seq, (name, (status, at)) in enumerate(rows.items()):
                session.add(
                    WebhookDelivery(
                        id=f"{endpoint_id}-{name}",
                        endpoint_id=endpoint_id,
                        event_seq=number * 100 + seq,
                        status=status,
                        created_at=at,
                        updated_at=at,
                    )
                )

    # a batch of one: every round must come back for the rest
    assert await prune_finished(database, now, batch=1) == 4

    async with database.transaction() as session:
        left = set((await session.scalars(select(WebhookDelivery.id))).all())
    assert left == {
        f"{endpoint}-{name}"
        for endpoint in ("ep-one", "ep-two")
        for name in ("old-queued", "recent-delivered", "recent-failed")
    }
    assert await prune_finished(database, now) == 0


async def test_nothing_to_prune_without_endpoints(database: Database) -> None:
    assert await prune_finished(database, utcnow()) == 0
