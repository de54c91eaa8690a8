"""Fan-out: the journal's new events become deliveries to the endpoints that want them.

The journal is the one source; `webhook_cursor.seq` is the last event fanned out. One step
reads the events after it in order, adds a queued delivery per matching enabled endpoint and
moves the cursor, all in one transaction: an event is fanned out once (no duplicates) and
none is skipped (the cursor never passes an event whose deliveries were not written). On
PostgreSQL the cursor row is locked, so instances fan out one after another; SQLite has one
writer anyway.

This rests on one property of the journal: an event's seq is visible only once every lower
seq is. Writers insert events without a number; the sequencer (gateway/store/sequencer.py)
hands out numbers in passes that each hold the chain's head row until they commit, together
with the head, so the pass that gave seq N commits before any other can give N+1: seq order
is the sequencer's commit order, whatever order the writers committed in. An event is fanned
out once it is chained. tests/webhooks/test_fanout.py holds the property.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.events import WEBHOOK_TEST_REQUESTED
from gateway.store.journal import seq_of
from gateway.store.models import (
    Event,
    JournalHead,
    WebhookCursor,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    new_id,
)

BATCH = 500


def wants(endpoint: WebhookEndpoint, event: Event, *, since_creation: bool = True) -> bool:
    """Whether `endpoint` receives `event`: a test only its own endpoint, the rest by type,
    and none from before the endpoint existed (unless a replay asks for those)."""
    if since_creation and event.at < endpoint.created_at:
        return False
    if event.type == WEBHOOK_TEST_REQUESTED.name:
        return bool(event.data.get("endpoint_id") == endpoint.id)
    return not endpoint.event_types or event.type in endpoint.event_types


def deliveries_for(
    endpoints: Sequence[WebhookEndpoint], events: Sequence[Event], now: datetime
) -> list[dict[str, object]]:
    """The rows to insert: one queued delivery per event and endpoint that wants it."""
    return [
        {
            "id": new_id(),
            "endpoint_id": endpoint.id,
            "event_seq": event.seq,
            "message_id": event.message_id,
            "status": WebhookDeliveryStatus.QUEUED,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for event in events
        for endpoint in endpoints
        if wants(endpoint, event)
    ]


async def behind(session: AsyncSession) -> bool:
    """Whether the journal holds events the fan-out has not taken yet: a read, so an idle
    relay's polling never takes SQLite's write lock from mail."""
    head = await session.scalar(select(JournalHead.seq).where(JournalHead.id == 1))
    done = await session.scalar(select(WebhookCursor.seq).where(WebhookCursor.id == 1))
    return (head or 0) > (done or 0)


async def fan_out_batch(session: AsyncSession, now: datetime, limit: int = BATCH) -> int:
    """Fan out up to `limit` events after the cursor in `session`; how many events it took."""
    cursor = (
        await session.execute(select(WebhookCursor).where(WebhookCursor.id == 1).with_for_update())
    ).scalar_one()
    endpoints = (
        await session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.enabled.is_(True)))
    ).all()
    if not endpoints:
        # nothing would go anywhere: step over the events without loading them (the chain
        # has no gaps, so the head tells how far)
        head = await session.scalar(select(JournalHead.seq).where(JournalHead.id == 1))
        taken = max(0, min((head or 0) - cursor.seq, limit))
        cursor.seq += taken
        return taken
    events = (
        await session.scalars(
            select(Event).where(Event.seq > cursor.seq).order_by(Event.seq).limit(limit)
        )
    ).all()
    if not events:
        return 0
    rows = deliveries_for(endpoints, events, now)
    if rows:  # a Core insert: no unit of work for rows nobody reads back here
        await session.execute(insert(WebhookDelivery), rows)
    cursor.seq = seq_of(events[-1])
    return len(events)
