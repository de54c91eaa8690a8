"""The webhook desk: every write on endpoints and their deliveries, for the CLI, console and API.

Each change to an endpoint is journaled in the same transaction (`webhook.endpoint_*`);
delivery attempts are not (they live in webhook_deliveries), or each attempt would itself be
an event to push. Secrets are shown once, when made; rotating keeps the previous secret
signing beside the new one for a grace period, so receivers can switch without losing a
message.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import journal, sequencer
from gateway.store.db import Database
from gateway.store.events import (
    CATALOG,
    WEBHOOK_ENDPOINT_CHANGED,
    WEBHOOK_ENDPOINT_CREATED,
    WEBHOOK_ENDPOINT_DELETED,
    WEBHOOK_ENDPOINT_DISABLED,
    WEBHOOK_TEST_REQUESTED,
    NewEvent,
)
from gateway.store.models import (
    Event,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    new_id,
    utcnow,
)
from gateway.texts.refusals import Refused
from gateway.webhooks import addresses
from gateway.webhooks.fanout import wants
from gateway.webhooks.payloads import new_secret
from gateway.webhooks.tunables import DESCRIPTION_LIMIT, REPLAY_LIMIT, ROTATION_GRACE


class WebhookError(Refused, ValueError):
    """A request on webhooks that cannot be done; said to the admin asking."""


class EndpointNotFound(WebhookError):
    pass


class EndpointDisabled(WebhookError):
    """The endpoint is disabled: nothing is sent to it until it is enabled."""


class NotATest(WebhookError):
    """The event asked about is not a test sent to this endpoint."""


class ReplayTooLarge(WebhookError):
    """A replay of more events than REPLAY_LIMIT: refused whole, nothing queued."""


class UrlRefused(WebhookError):
    """The URL is malformed or leads to an address webhooks may not reach."""


class PrivateUrlRefused(UrlRefused):
    """The URL leads to a private address and the endpoint does not allow them."""


@dataclass(frozen=True)
class Created:
    """A new endpoint and its secret, which is shown this once."""

    endpoint: WebhookEndpoint
    secret: str


@dataclass(frozen=True)
class DeliveryView:
    """One delivery as the console lists it."""

    id: str
    event_seq: int
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class EndpointFigures:
    """What the console shows at a glance: how much waits, how much was given up in the last
    day, and when the receiver last accepted a post."""

    pending: int
    failed_last_day: int
    last_success: datetime | None


def _view(d: WebhookDelivery, event_type: str) -> DeliveryView:
    return DeliveryView(
        d.id,
        d.event_seq,
        event_type,
        d.status,
        d.attempts,
        d.last_status_code,
        d.last_error,
        d.next_attempt_at,
        d.updated_at,
    )


def checked_types(event_types: Sequence[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(CATALOG))
    if unknown:
        types = ", ".join(unknown)
        meant = ", ".join(m for m in map(_meant_type, unknown) if m)
        if meant:
            raise WebhookError("webhook.unknown_types_meant", types=types, meant=meant)
        raise WebhookError("webhook.unknown_types", types=types)
    return list(dict.fromkeys(event_types))


def _meant_type(name: str) -> str | None:
    """The catalog's type a mistyped one most likely stands for (download.first for
    downlod.first), as check-config guesses a mistyped setting."""
    close = difflib.get_close_matches(name, list(CATALOG), n=1, cutoff=0.8)
    return close[0] if close else None


def checked_description(description: str) -> str:
    if len(description) > DESCRIPTION_LIMIT:
        raise WebhookError("webhook.description_length", maximum=DESCRIPTION_LIMIT)
    return description


class WebhookDesk:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock

    async def _url(self, url: str, allow_private: bool) -> str:
        try:
            await addresses.check(url, allow_private=allow_private)
        except addresses.PrivateAddress as exc:
            raise PrivateUrlRefused(exc.key, **exc.params) from exc
        except addresses.EndpointUrlError as exc:
            raise UrlRefused(exc.key, **exc.params) from exc
        return url

    async def create(
        self,
        url: str,
        *,
        event_types: Sequence[str] = (),
        description: str = "",
        enabled: bool = True,
        thin: bool = False,
        allow_private: bool = False,
        by: str = "cli",
    ) -> Created:
        types = checked_types(event_types)
        checked_description(description)
        await self._url(url, allow_private)
        now = self.clock()
        secret = new_secret()
        endpoint = WebhookEndpoint(
            id=new_id(),
            url=url,
            description=description,
            event_types=types,
            enabled=enabled,
            thin=thin,
            allow_private=allow_private,
            secret=secret,
            created_at=now,
        )
        async with self.db.transaction() as session:
            session.add(endpoint)
            await journal.append(
                session,
                [
                    WEBHOOK_ENDPOINT_CREATED.new(
                        {
                            "endpoint_id": endpoint.id,
                            "url": url,
                            "event_types": types,
                            "thin": thin,
                            "allow_private": allow_private,
                            "by": by,
                        }
                    )
                ],
                now,
            )
        return Created(endpoint, secret)

    async def list_endpoints(self) -> list[WebhookEndpoint]:
        async with self.db.transaction() as session:
            rows = await session.scalars(
                select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
            )
            return list(rows)

    async def get(self, endpoint_id: str) -> WebhookEndpoint:
        async with self.db.transaction() as session:
            return await _endpoint(session, endpoint_id)

    async def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        event_types: Sequence[str] | None = None,
        description: str | None = None,
        thin: bool | None = None,
        allow_private: bool | None = None,
        by: str = "cli",
    ) -> WebhookEndpoint:
        """Change what is given; the URL is checked again when it or allow_private changes."""
        types = checked_types(event_types) if event_types is not None else None
        if description is not None:
            checked_description(description)
        current = await self.get(endpoint_id)
        if url is not None or allow_private is not None:
            await self._url(
                url if url is not None else current.url,
                allow_private if allow_private is not None else current.allow_private,
            )
        asked = {
            "url": url,
            "event_types": types,
            "description": description,
            "thin": thin,
            "allow_private": allow_private,
        }
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id, lock=True)
            changed = []
            for name, value in asked.items():
                if value is not None and getattr(endpoint, name) != value:
                    setattr(endpoint, name, value)
                    changed.append(name)
            if changed:
                await journal.append(session, [_changed(endpoint.id, changed, by)], self.clock())
            return endpoint

    async def enable(self, endpoint_id: str, *, by: str = "cli") -> WebhookEndpoint:
        """Deliver again from now on; what was given up meanwhile comes back only by replay."""
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id, lock=True)
            if not endpoint.enabled:
                endpoint.enabled = True
                endpoint.disabled_reason = None
                endpoint.failing_since = None
                await journal.append(
                    session, [_changed(endpoint.id, ["enabled"], by)], self.clock()
                )
            return endpoint

    async def disable(
        self, endpoint_id: str, *, reason: str = "disabled by an admin", by: str = "cli"
    ) -> WebhookEndpoint:
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id, lock=True)
            if endpoint.enabled:
                event = await disable_in(session, endpoint, reason, by, self.clock())
                await journal.append(session, [event], self.clock())
            return endpoint

    async def delete(self, endpoint_id: str, *, by: str = "cli") -> None:
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id, lock=True)
            await session.execute(
                delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
            )
            await session.delete(endpoint)
            await journal.append(
                session,
                [
                    WEBHOOK_ENDPOINT_DELETED.new(
                        {"endpoint_id": endpoint.id, "url": endpoint.url, "by": by}
                    )
                ],
                self.clock(),
            )

    async def rotate_secret(
        self, endpoint_id: str, *, grace: timedelta = ROTATION_GRACE, by: str = "cli"
    ) -> str:
        """A new secret (returned, shown once); the current one keeps signing for `grace`."""
        now = self.clock()
        secret = new_secret()
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id, lock=True)
            endpoint.previous_secret = endpoint.secret
            endpoint.previous_secret_until = now + grace
            endpoint.secret = secret
            await journal.append(session, [_changed(endpoint.id, ["secret"], by)], now)
        return secret

    async def send_test(self, endpoint_id: str, *, by: str = "cli") -> int:
        """Journal a `webhook.test` for this endpoint; the fan-out posts it there. Its seq,
        so it is chained here rather than by the next pass of the sequencer."""
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id)
            if not endpoint.enabled:
                raise EndpointDisabled("webhook.disabled", endpoint=endpoint_id)
            [event_id] = await journal.append(
                session,
                [WEBHOOK_TEST_REQUESTED.new({"endpoint_id": endpoint.id, "by": by})],
                self.clock(),
            )
        return await sequencer.chained_seq(self.db, event_id)

    async def replay(
        self,
        endpoint_id: str,
        *,
        seq: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """Queue events again for this endpoint: one (`seq`), or every event of its types in
        the time range [since, until). They carry their own webhook-id, as the first time, and
        keep their order per message (the worker's claim sees to that). How many were queued.

        A range leaves out events already queued for the endpoint (and other endpoints'
        `webhook.test` events), and is refused whole when it holds more than REPLAY_LIMIT
        events: a half-done replay is harder to reason about than a shorter range."""
        if (seq is None) == (since is None and until is None):
            raise WebhookError("webhook.replay_what")
        if since is not None and until is not None and since >= until:
            raise WebhookError("webhook.range_reversed")
        now = self.clock()
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id)
            if not endpoint.enabled:
                raise EndpointDisabled("webhook.disabled", endpoint=endpoint_id)
            if seq is not None:
                events = await _one_event(session, endpoint, seq)
            else:
                events = await _range(session, endpoint, since, until)
            if events:  # a Core insert, as the fan-out does: nothing here reads them back
                await session.execute(
                    insert(WebhookDelivery),
                    [
                        {
                            "id": new_id(),
                            "endpoint_id": endpoint.id,
                            "event_seq": event_seq,
                            "message_id": message_id,
                            "status": WebhookDeliveryStatus.QUEUED,
                            "attempts": 0,
                            "next_attempt_at": now,
                            "created_at": now,
                            "updated_at": now,
                        }
                        for event_seq, message_id in events
                    ],
                )
            return len(events)

    async def deliveries(self, endpoint_id: str, limit: int = 50) -> list[DeliveryView]:
        """The endpoint's most recent deliveries, newest first."""
        async with self.db.transaction() as session:
            await _endpoint(session, endpoint_id)
            rows = await session.execute(
                select(WebhookDelivery, Event.type)
                .join(Event, Event.seq == WebhookDelivery.event_seq)
                .where(WebhookDelivery.endpoint_id == endpoint_id)
                .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.event_seq.desc())
                .limit(limit)
            )
            return [_view(d, type_) for d, type_ in rows]

    async def test_delivery(self, endpoint_id: str, seq: int) -> DeliveryView | None:
        """What the test event `seq` sent to this endpoint came to: its latest delivery, None
        while it is not fanned out yet. NotATest when `seq` is no test of this endpoint's."""
        async with self.db.transaction() as session:
            await _endpoint(session, endpoint_id)
            event = await _chained(session, seq) if 0 < seq < 2**62 else None
            if (
                event is None
                or event.type != WEBHOOK_TEST_REQUESTED.name
                or event.data.get("endpoint_id") != endpoint_id
            ):
                raise NotATest("webhook.not_a_test", seq=seq, endpoint=endpoint_id)
            row = (
                await session.execute(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.endpoint_id == endpoint_id,
                        WebhookDelivery.event_seq == seq,
                    )
                    .order_by(WebhookDelivery.created_at.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            return None if row is None else _view(row, event.type)

    async def figures(self, endpoint_id: str) -> EndpointFigures:
        """Pending deliveries, those given up in the last 24 hours, the last success."""
        day_ago = self.clock() - timedelta(hours=24)
        mine = WebhookDelivery.endpoint_id == endpoint_id
        async with self.db.transaction() as session:
            await _endpoint(session, endpoint_id)
            pending = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(mine, WebhookDelivery.status == WebhookDeliveryStatus.QUEUED)
            )
            failed = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(
                    mine,
                    WebhookDelivery.status == WebhookDeliveryStatus.FAILED,
                    WebhookDelivery.updated_at >= day_ago,
                )
            )
            last = await session.scalar(
                select(func.max(WebhookDelivery.updated_at)).where(
                    mine, WebhookDelivery.status == WebhookDeliveryStatus.DELIVERED
                )
            )
        return EndpointFigures(int(pending or 0), int(failed or 0), last)

    async def pending(self) -> int:
        """Deliveries still queued, over all endpoints."""
        async with self.db.transaction() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == WebhookDeliveryStatus.QUEUED)
            )
        return int(count or 0)


async def _endpoint(
    session: AsyncSession, endpoint_id: str, *, lock: bool = False
) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id, with_for_update=lock)
    if endpoint is None:
        raise EndpointNotFound("webhook.unknown", endpoint=endpoint_id)
    return endpoint


async def _chained(session: AsyncSession, seq: int) -> Event | None:
    return await session.scalar(select(Event).where(Event.seq == seq))


async def _one_event(
    session: AsyncSession, endpoint: WebhookEndpoint, seq: int
) -> list[tuple[int, str | None]]:
    event = await _chained(session, seq)
    if event is None:
        raise WebhookError("webhook.no_event", seq=seq)
    # An explicit replay may reach back before the endpoint existed.
    if not wants(endpoint, event, since_creation=False):
        raise WebhookError("webhook.not_received", endpoint=endpoint.id, type=event.type)
    return [(seq, event.message_id)]


async def _range(
    session: AsyncSession,
    endpoint: WebhookEndpoint,
    since: datetime | None,
    until: datetime | None,
) -> list[tuple[int, str | None]]:
    """The events of `endpoint`'s types in [since, until) not queued for it already, in
    order; refused when there are more than REPLAY_LIMIT."""
    queued = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.event_seq == Event.seq,
            WebhookDelivery.status == WebhookDeliveryStatus.QUEUED,
        )
        .exists()
    )
    query = (
        select(Event.seq, Event.message_id, Event.type, Event.data)
        # chained events only: one not chained yet reaches the fan-out when it is
        .where(~queued, Event.seq.is_not(None))
        .order_by(Event.seq)
        .limit(REPLAY_LIMIT + 1)
    )
    if endpoint.event_types:  # its own tests it receives whatever its types (fanout.wants)
        query = query.where(
            or_(
                Event.type.in_(list(endpoint.event_types)),
                Event.type == WEBHOOK_TEST_REQUESTED.name,
            )
        )
    if since is not None:
        query = query.where(Event.at >= since)
    if until is not None:
        query = query.where(Event.at < until)
    rows = [
        (int(seq), message_id)
        for seq, message_id, type_, data in (await session.execute(query)).all()
        if type_ != WEBHOOK_TEST_REQUESTED.name or data.get("endpoint_id") == endpoint.id
    ]
    if len(rows) > REPLAY_LIMIT:
        raise ReplayTooLarge("webhook.replay_too_large", maximum=REPLAY_LIMIT)
    return rows


def _changed(endpoint_id: str, changed: list[str], by: str) -> NewEvent:
    return WEBHOOK_ENDPOINT_CHANGED.new({"endpoint_id": endpoint_id, "changed": changed, "by": by})


async def disable_in(
    session: AsyncSession, endpoint: WebhookEndpoint, reason: str, by: str, now: datetime
) -> NewEvent:
    """Disable `endpoint` in `session` and give up its queued deliveries; the event to journal."""
    endpoint.enabled = False
    endpoint.disabled_reason = reason
    await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.status == WebhookDeliveryStatus.QUEUED,
        )
        .values(
            status=WebhookDeliveryStatus.FAILED,
            last_error=f"endpoint disabled: {reason}",
            lease_until=None,
            leased_by=None,
            updated_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    return WEBHOOK_ENDPOINT_DISABLED.new({"endpoint_id": endpoint.id, "reason": reason, "by": by})
