"""The database questions of /healthz and /metrics, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.outbound.queue import new_delivery
from gateway.store import health
from gateway.store.db import Database
from gateway.store.models import DeliveryStatus, Message

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


async def test_database_answers(database: Database) -> None:
    await health.database_answers(database)


async def test_queue_depths_name_every_status(database: Database) -> None:
    assert await health.queue_depths(database) == {s.value: 0 for s in DeliveryStatus}
    async with database.transaction() as session:
        message = Message(
            sender="agent@broker.example",
            blob="0" * 64,
            size=0,
            message_id_header="<m@broker.example>",
            subject="Exposé",
            received_at=NOW,
        )
        session.add(message)
        await session.flush()
        deliveries = [
            new_delivery(message.id, f"r{n}@example.com", "0" * 64, NOW, 60) for n in range(3)
        ]
        deliveries[0].status = DeliveryStatus.DELIVERED
        session.add_all(deliveries)
    depths = await health.queue_depths(database)
    assert depths[DeliveryStatus.DELIVERED.value] == 1
    assert sum(depths.values()) == 3
    assert set(depths) == {s.value for s in DeliveryStatus}
