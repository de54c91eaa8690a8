"""The outbound queue: deliveries claimed with a lease, their state kept per recipient.

Claims, leases, their renewal and the backoff are the ones every queue shares
(gateway/store/leases.py, webhooks use them too). A live worker renews the leases of copies it
still holds (a heartbeat), so the lease can be short and a crashed worker's claims come back
quickly. Outcomes are recorded only by the worker that still holds the lease.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import bulk, journal
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.events import (
    DELIVERY_BOUNCED,
    DELIVERY_DEFERRED,
    DELIVERY_DELETED,
    DELIVERY_DELIVERED,
    DELIVERY_RETRIED,
    EventType,
)
from gateway.store.group_commit import Done
from gateway.store.leases import LeasedQueue, backoff
from gateway.store.models import AgentLogin, Base, Delivery, DeliveryStatus, Message, new_id
from gateway.store.raw_sql import RawStatement, loaded
from gateway.texts.refusals import Refused, Term

__all__ = [
    "LEASES",
    "Attempt",
    "Claimed",
    "Hold",
    "QueueError",
    "Settle",
    "backoff",
    "bounced",
    "claim",
    "deferred",
    "delivered",
    "new_delivery",
]

LEASES = LeasedQueue(Delivery, DeliveryStatus.QUEUED)


class QueueError(Refused):
    """An admin request on the queue that cannot be done; said to the admin asking."""


class UnknownDelivery(QueueError):
    """No copy in the queue has the id given."""


def new_delivery(
    message_id: str,
    recipient: str,
    blob: str,
    now: datetime,
    lifetime: float,
    *,
    keep_signed: bool = False,
) -> Delivery:
    """One copy to one recipient, due now, given up after `lifetime` seconds.

    `keep_signed`: the copy is evidence (a released original), so the worker stores the
    DKIM-signed bytes it delivers (`signed_blob`)."""
    return bulk.new_row(
        Delivery,
        id=new_id(),
        message_id=message_id,
        recipient=recipient,
        blob=blob,
        next_attempt_at=now,
        expires_at=now + timedelta(seconds=lifetime),
        keep_signed=keep_signed,
    )


@dataclass(frozen=True)
class Claimed:
    """A claimed copy with its message; `login_changed`: when the sender's own upstream login
    last changed (None without one), read with the claim so that the worker need not ask the
    database again per group (gateway/agent_logins.py caches the opened login by it)."""

    delivery: Delivery
    message: Message
    login_changed: datetime | None = None


_DELIVERY = loaded(Delivery)
_MESSAGE = loaded(Message)


async def claim(
    session: AsyncSession, worker: str, now: datetime, lease: timedelta, limit: int
) -> list[Claimed]:
    """Lease up to `limit` due copies to `worker`, each with its message."""
    return await session.run_sync(
        lambda sync: Claim(worker, now, lease, limit)(sync.connection()).result
    )


@dataclass(frozen=True)
class Claim:
    """The claim as a unit of the group commit (gateway/store/group_commit.py): the lease is
    written in the transaction that also carries intake's new copies, so claiming costs no
    commit of its own.

    Read with Core, not the ORM's identity map: the rows become plain (transient) objects,
    which costs a fraction of loading them into a session.
    """

    worker: str
    now: datetime
    lease: timedelta
    limit: int

    def __call__(self, connection: Connection) -> Done[list[Claimed]]:
        ids = LEASES.claim_rows(connection, self.worker, self.now, self.lease, self.limit)
        if not ids:
            return Done([])
        rows = _claimed_rows().rows(connection, {"ids": ids})
        split = len(_DELIVERY)
        claimed = []
        messages: dict[str, Message] = {}
        for row in rows:
            delivery = _DELIVERY.load(row[:split])
            message = messages.get(delivery.message_id)
            if message is None:
                message = messages[delivery.message_id] = _MESSAGE.load(row[split:-1])
            claimed.append(Claimed(delivery, message, row[-1]))
        return Done(claimed)


@functools.cache
def _claimed_rows() -> RawStatement:
    """The claimed copies with their messages, built once: building it per claim cost more
    CPU than running it."""
    return RawStatement(
        select(
            *_DELIVERY.columns,
            *_MESSAGE.columns,
            AgentLogin.updated_at,
        )
        .select_from(Delivery.__table__)
        .join(Message.__table__, Message.id == Delivery.message_id)
        .outerjoin(AgentLogin, AgentLogin.user_id == Message.user_id)
        .where(Delivery.id.in_(bindparam("ids", expanding=True)))
        .order_by(Delivery.message_id, Delivery.id)
    )


async def renew(
    session: AsyncSession, ids: Collection[str], worker: str, now: datetime, lease: timedelta
) -> int:
    """Extend the lease on copies `worker` still holds (its heartbeat); how many it kept.

    A copy whose lease another worker took over is left alone: its outcome is theirs.
    """
    return await LEASES.renew(session, ids, worker, now, lease)


@dataclass(frozen=True)
class Hold:
    """Just before a group leaves, as a unit of the group commit: extend the lease of its
    copies that `worker` still holds to `until` (as long as the send and its recording may
    take); the result is the ids still held. A copy taken over by another worker while this
    one waited for a slot is not sent here: the other worker sends it."""

    worker: str
    ids: Collection[str]
    until: datetime

    def __call__(self, connection: Connection) -> Done[set[str]]:
        return Hold.run_together(connection, [self])[0]

    @staticmethod
    def run_together(connection: Connection, holds: Sequence[Hold]) -> list[Done[set[str]]]:
        """Every hold of a group commit's batch in two statements, not one per group."""
        held = LEASES.hold_each(connection, [(h.ids, h.worker, h.until) for h in holds])
        return [Done(ids) for ids in held]


async def release(session: AsyncSession, ids: Collection[str], worker: str) -> None:
    """Give claimed copies back unsent (a stopping worker), so any worker may take them now."""
    await LEASES.release(session, ids, worker)


@dataclass(frozen=True)
class Attempt:
    """One attempt's outcome to record: the copy's new `values` and the journal event (`event`
    with `data`) that says so, written only if the worker still holds the lease."""

    delivery: Delivery
    event: EventType[Any]
    data: dict[str, object]
    values: dict[str, object]

    def new_event(self) -> journal.NewEvent:
        return self.event.new(
            self.data, message_id=self.delivery.message_id, delivery_id=self.delivery.id
        )


def _attempt(
    delivery: Delivery,
    event: EventType[Any],
    data: dict[str, object],
    route: str | None,
    **values: object,
) -> Attempt:
    """`route`: the [[routes]] entry the attempt took."""
    attempt = delivery.attempts + 1
    taken = {"route": route} if route is not None else {}
    return Attempt(
        delivery,
        event,
        {"recipient": delivery.recipient, "attempt": attempt, **data, **taken},
        {"attempts": attempt, **taken, **values},
    )


def delivered(
    delivery: Delivery,
    remote: str | None,
    signed_blob: str | None = None,
    *,
    route: str | None = None,
) -> Attempt:
    """`signed_blob`: the stored bytes as delivered, for a copy that keeps them; `route`:
    how it left when not the default way ("agent-login")."""
    kept = {"signed_blob": signed_blob} if signed_blob and delivery.keep_signed else {}
    return _attempt(
        delivery,
        DELIVERY_DELIVERED,
        {"remote": remote},
        route,
        status=DeliveryStatus.DELIVERED,
        last_error=None,
        **kept,
    )


def deferred(
    delivery: Delivery, error: str, next_attempt: datetime, *, route: str | None = None
) -> Attempt:
    return _attempt(
        delivery,
        DELIVERY_DEFERRED,
        {"error": error, "next_attempt": next_attempt.isoformat()},
        route,
        last_error=error,
        next_attempt_at=next_attempt,
    )


def bounced(delivery: Delivery, error: str, *, status: str, route: str | None = None) -> Attempt:
    """Given up for good; ``status`` is the final one the DSN reports (4.4.7 once expired)."""
    return _attempt(
        delivery,
        DELIVERY_BOUNCED,
        {"error": error, "status": status},
        route,
        status=DeliveryStatus.BOUNCED,
        last_error=error,
    )


@dataclass(frozen=True)
class Settle:
    """The outcomes of one group of copies, as a unit of the group commit
    (gateway/store/group_commit.py): recorded where `worker` still holds the lease, together
    with the batch's other settles (`run_together`), with their journal events, and
    `bounce_rows` (a DSN's message and delivery) with `bounce_events` when one of them
    bounced. Its result: per attempt, its event, or None where another worker took over."""

    worker: str
    now: datetime
    attempts: Sequence[Attempt]
    bounce_rows: Sequence[Base] = ()
    bounce_events: Sequence[journal.NewEvent] = ()

    def __call__(self, connection: Connection) -> Done[list[journal.NewEvent | None]]:
        return Settle.run_together(connection, [self])[0]

    @staticmethod
    def run_together(
        connection: Connection, settles: Sequence[Settle]
    ) -> list[Done[list[journal.NewEvent | None]]]:
        """Every settle of a group commit's batch at once: one statement reads who holds the
        copies, one executemany per kind of outcome records them."""
        held = iter(
            LEASES.settle_each(
                connection,
                [
                    (a.delivery.id, s.worker, {"updated_at": s.now, **a.values})
                    for s in settles
                    for a in s.attempts
                ],
            )
        )
        done = []
        for settle in settles:
            outcomes = [a.new_event() if next(held) else None for a in settle.attempts]
            recorded = [event for event in outcomes if event is not None]
            if settle.bounce_rows and any(e.type == DELIVERY_BOUNCED.name for e in recorded):
                bulk.insert_rows(connection, settle.bounce_rows)
                recorded += settle.bounce_events
            done.append(Done(outcomes, recorded, settle.now))
        return done


async def _settle(
    session: AsyncSession, worker: str, now: datetime, attempt: Attempt
) -> journal.NewEvent | None:
    """Record one attempt's outcome in `session` if `worker` still holds the lease; the
    journal event for it, or None when another worker took over."""
    settled = await LEASES.settle(
        session, attempt.delivery.id, worker, updated_at=now, **attempt.values
    )
    return attempt.new_event() if settled else None


async def mark_delivered(
    session: AsyncSession,
    delivery: Delivery,
    worker: str,
    now: datetime,
    remote: str | None,
    signed_blob: str | None = None,
    *,
    route: str | None = None,
) -> journal.NewEvent | None:
    return await _settle(
        session, worker, now, delivered(delivery, remote, signed_blob, route=route)
    )


async def mark_deferred(
    session: AsyncSession,
    delivery: Delivery,
    worker: str,
    now: datetime,
    error: str,
    next_attempt: datetime,
    *,
    route: str | None = None,
) -> journal.NewEvent | None:
    return await _settle(session, worker, now, deferred(delivery, error, next_attempt, route=route))


async def mark_bounced(
    session: AsyncSession,
    delivery: Delivery,
    worker: str,
    now: datetime,
    error: str,
    *,
    status: str,
    route: str | None = None,
) -> journal.NewEvent | None:
    return await _settle(session, worker, now, bounced(delivery, error, status=status, route=route))


async def list_deliveries(
    session: AsyncSession, statuses: Sequence[str] = (DeliveryStatus.QUEUED,), limit: int = 1000
) -> list[Claimed]:
    rows = await session.execute(
        select(Delivery, Message)
        .join(Message, Message.id == Delivery.message_id)
        .where(Delivery.status.in_(statuses))
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    return [Claimed(delivery, message) for delivery, message in rows]


async def check_kept(blobs: BlobStore, delivery: Delivery) -> None:
    """QueueError for a bounced copy whose bytes the sweep has deleted ([storage]
    keep_originals_days): a retry would queue a copy that can only fail until it expires.
    Asked before the retry's transaction (the store is not asked inside one); a store that
    cannot be asked leaves the retry to the worker, which defers the copy."""
    if delivery.status != DeliveryStatus.BOUNCED:
        return
    try:
        kept = await blobs.exists(delivery.blob)
    except StoreUnavailable:
        return
    if not kept:
        raise QueueError("queue.not_kept", recipient=delivery.recipient)


async def retry_now(
    session: AsyncSession, delivery_id: str, now: datetime, lifetime: timedelta
) -> Delivery:
    """Make a queued copy due at once; a bounced one is queued again for a new lifetime."""
    delivery = await _get(session, delivery_id, now)
    if delivery.status not in (DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED):
        raise QueueError(
            "queue.no_retry",
            delivery=delivery_id,
            status=Term(f"work.queue_status.{delivery.status}"),
        )
    if delivery.status == DeliveryStatus.BOUNCED:
        delivery.expires_at = now + lifetime
    delivery.status = DeliveryStatus.QUEUED
    delivery.next_attempt_at = now
    delivery.lease_until = None
    delivery.leased_by = None
    await journal.append(
        session,
        [
            DELIVERY_RETRIED.new(
                {"recipient": delivery.recipient},
                message_id=delivery.message_id,
                delivery_id=delivery.id,
            )
        ],
        now,
    )
    return delivery


async def delete(session: AsyncSession, delivery_id: str, now: datetime) -> Delivery:
    """Give up a queued copy without a bounce, as an admin decides."""
    delivery = await _get(session, delivery_id, now)
    if delivery.status != DeliveryStatus.QUEUED:
        raise QueueError(
            "queue.not_queued",
            delivery=delivery_id,
            status=Term(f"work.queue_status.{delivery.status}"),
        )
    delivery.status = DeliveryStatus.DELETED
    delivery.lease_until = None
    delivery.leased_by = None
    await journal.append(
        session,
        [
            DELIVERY_DELETED.new(
                {"recipient": delivery.recipient},
                message_id=delivery.message_id,
                delivery_id=delivery.id,
            )
        ],
        now,
    )
    return delivery


async def _get(session: AsyncSession, delivery_id: str, now: datetime) -> Delivery:
    """The delivery, unless a worker is sending it right now (changing it could send twice)."""
    delivery = await session.get(Delivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise UnknownDelivery("queue.unknown", delivery=delivery_id)
    if delivery.lease_until is not None and delivery.lease_until > now:
        raise QueueError("queue.sending", delivery=delivery_id)
    return delivery


async def copies_of(
    session: AsyncSession, message_or_delivery_id: str, recipients: Sequence[str] = ()
) -> list[Delivery]:
    """The copies an admin names: all of a message's (or those to `recipients`), by the id
    the agent got in the 250 reply; a delivery's own id still names just that copy."""
    rows = await session.scalars(
        select(Delivery)
        .where(
            or_(
                Delivery.message_id == message_or_delivery_id,
                Delivery.id == message_or_delivery_id,
            )
        )
        .order_by(Delivery.id)
    )
    wanted = {address.lower() for address in recipients}
    return [d for d in rows if not wanted or d.recipient.lower() in wanted]
