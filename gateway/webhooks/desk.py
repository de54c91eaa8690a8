"""The webhook desk: every write on endpoints and their deliveries, for the CLI, console and API.

Each change to an endpoint is journaled in the same transaction (`webhook.endpoint_*`);
delivery attempts are not (they live in webhook_deliveries), or each attempt would itself be
an event to push. Secrets are shown once, when made; rotating keeps the previous secret
signing beside the new one for a grace period, so receivers can switch without losing a
message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store import journal
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
from gateway.webhooks import addresses
from gateway.webhooks.fanout import wants
from gateway.webhooks.payloads import new_secret
from gateway.webhooks.tunables import DESCRIPTION_LIMIT, REPLAY_LIMIT, ROTATION_GRACE


class WebhookError(ValueError):
    """A request on webhooks that cannot be done; the text says why, for the admin."""


class EndpointNotFound(WebhookError):
    pass


class EndpointDisabled(WebhookError):
    """The endpoint is disabled: nothing is sent to it until it is enabled."""


class UrlRefused(WebhookError):
    """The URL is malformed or leads to an address webhooks may not reach."""


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


def checked_types(event_types: Sequence[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(CATALOG))
    if unknown:
        raise WebhookError(
            f"unknown event type(s): {', '.join(unknown)} (see docs/events.md for the catalog)"
        )
    return list(dict.fromkeys(event_types))


def checked_description(description: str) -> str:
    if len(description) > DESCRIPTION_LIMIT:
        raise WebhookError(f"the description is longer than {DESCRIPTION_LIMIT} characters")
    return description


class WebhookDesk:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock

    async def _url(self, url: str, allow_private: bool) -> str:
        try:
            await addresses.check(url, allow_private=allow_private)
        except addresses.EndpointUrlError as exc:
            raise UrlRefused(str(exc)) from exc
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
        """Journal a `webhook.test` for this endpoint; the fan-out posts it there. Its seq."""
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id)
            if not endpoint.enabled:
                raise EndpointDisabled(f"endpoint {endpoint_id} is disabled; enable it first")
            [event] = await journal.append(
                session,
                [WEBHOOK_TEST_REQUESTED.new({"endpoint_id": endpoint.id, "by": by})],
                self.clock(),
            )
            return event.seq

    async def replay(
        self,
        endpoint_id: str,
        *,
        seq: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """Queue the events again for this endpoint: one (`seq`) or those of a time range
        [since, until) that it receives. They carry their own webhook-id, as the first time.
        How many were queued."""
        if (seq is None) == (since is None and until is None):
            raise WebhookError("replay one event (seq) or a time range (since, until)")
        if since is not None and until is not None and since >= until:
            raise WebhookError("the range is empty: since must be before until")
        now = self.clock()
        async with self.db.transaction() as session:
            endpoint = await _endpoint(session, endpoint_id)
            if not endpoint.enabled:
                raise EndpointDisabled(f"endpoint {endpoint_id} is disabled; enable it first")
            query = select(Event).order_by(Event.seq).limit(REPLAY_LIMIT + 1)
            if seq is not None:
                query = query.where(Event.seq == seq)
            if since is not None:
                query = query.where(Event.at >= since)
            if until is not None:
                query = query.where(Event.at < until)
            events = list(await session.scalars(query))
            if seq is not None and not events:
                raise WebhookError(f"no event {seq} in the journal")
            if len(events) > REPLAY_LIMIT:
                raise WebhookError(f"more than {REPLAY_LIMIT} events; replay a shorter range")
            # An explicit replay may reach back before the endpoint existed.
            matching = [e for e in events if wants(endpoint, e, since_creation=False)]
            if seq is not None and not matching:
                raise WebhookError(f"endpoint {endpoint_id} does not receive {events[0].type}")
            session.add_all(
                WebhookDelivery(
                    id=new_id(),
                    endpoint_id=endpoint.id,
                    event_seq=e.seq,
                    message_id=e.message_id,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                for e in matching
            )
            return len(matching)

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
            return [
                DeliveryView(
                    d.id,
                    d.event_seq,
                    type_,
                    d.status,
                    d.attempts,
                    d.last_status_code,
                    d.last_error,
                    d.next_attempt_at,
                    d.updated_at,
                )
                for d, type_ in rows
            ]

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
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id}")
    return endpoint


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
