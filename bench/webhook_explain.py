"""EXPLAIN the queries that read webhook_deliveries, on a database filled to a realistic size.

    .venv/bin/python bench/webhook_explain.py sqlite+aiosqlite:////tmp/explain.db
    .venv/bin/python bench/webhook_explain.py postgresql+asyncpg://postgres@127.0.0.1/explain

Creates the schema from the models (dropping what is there: use a scratch database), writes
100,000 events and, for ten endpoints, a delivery of every second event (500,000 rows; 2 %
failed, the last 200 events queued), then prints each query's plan and time: the worker's
claim (with its per-message order check), the endpoint page's newest-first listing, its three
figures and one event's delivery. Run it after changing an index or one of these queries;
gateway/store/migrations/versions/0007_webhook_console.py records what it showed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.store.models import Base, Event, WebhookDelivery, WebhookEndpoint, new_id, utcnow
from gateway.store.models import WebhookDeliveryStatus as Status
from gateway.webhooks.worker import claimable

EVENTS, ENDPOINTS, CHUNK = 100_000, 10, 5000


def queries(endpoint_id: str) -> dict[str, Any]:
    now = utcnow()
    mine = WebhookDelivery.endpoint_id == endpoint_id
    d = WebhookDelivery
    return {
        "claim": select(d.id)
        .where(d.status == Status.QUEUED, d.next_attempt_at <= now, *claimable())
        .order_by(d.next_attempt_at)
        .limit(16),
        "listing": select(d, Event.type)
        .join(Event, Event.seq == d.event_seq)
        .where(mine)
        .order_by(d.created_at.desc(), d.event_seq.desc())
        .limit(50),
        "pending": select(func.count()).select_from(d).where(mine, d.status == Status.QUEUED),
        "failed_last_day": select(func.count())
        .select_from(d)
        .where(mine, d.status == Status.FAILED, d.updated_at >= now - timedelta(hours=24)),
        "last_success": select(func.max(d.updated_at)).where(mine, d.status == Status.DELIVERED),
        "delivery_of": select(d.id)
        .where(mine, d.event_seq == EVENTS // 2)
        .order_by(d.created_at.desc())
        .limit(1),
    }


async def main(url: str) -> None:
    engine = create_async_engine(url)
    sqlite = url.startswith("sqlite")
    now = utcnow()
    endpoints = [new_id() for _ in range(ENDPOINTS)]
    async with engine.begin() as c:
        await c.run_sync(Base.metadata.drop_all)
        await c.run_sync(Base.metadata.create_all)
        await c.execute(
            insert(WebhookEndpoint),
            [
                {"id": e, "url": "http://x/", "description": "", "event_types": [],
                 "enabled": True, "thin": False, "allow_private": False, "secret": "s",
                 "created_at": now}
                for e in endpoints
            ],
        )  # fmt: skip
        events = [
            {"seq": i, "at": now - timedelta(seconds=EVENTS - i), "type": "message.received",
             "message_id": f"m{i // 5}", "data": {}, "prev_hash": "", "hash": f"h{i}"}
            for i in range(1, EVENTS + 1)
        ]  # fmt: skip
        for i in range(0, len(events), CHUNK):
            await c.execute(insert(Event), events[i : i + CHUNK])
        rows = []
        for e in endpoints:
            for i in range(1, EVENTS + 1, 2):
                status = (
                    Status.QUEUED
                    if i > EVENTS - 200
                    else (Status.FAILED if random.random() < 0.02 else Status.DELIVERED)
                )
                at = now - timedelta(seconds=EVENTS - i)
                rows.append(
                    {"id": new_id(), "endpoint_id": e, "event_seq": i, "message_id": f"m{i // 5}",
                     "status": status, "attempts": 1, "next_attempt_at": at, "created_at": at,
                     "updated_at": at}
                )  # fmt: skip
        for i in range(0, len(rows), CHUNK):
            await c.execute(insert(WebhookDelivery), rows[i : i + CHUNK])
        for table in ("" if sqlite else " webhook_deliveries", "" if sqlite else " events"):
            await c.execute(text("ANALYZE" + table))
    explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN (ANALYZE, COSTS off) "
    async with engine.connect() as c:
        for name, query in queries(endpoints[3]).items():
            sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
            plan = (await c.execute(text(explain + sql))).all()
            started = time.perf_counter()
            await c.execute(text(sql))
            print(f"== {name} ({(time.perf_counter() - started) * 1000:.1f} ms)")
            for row in plan:
                print("   ", row[-1])
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
