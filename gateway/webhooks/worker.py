"""The webhook worker: fan the journal out, claim due deliveries, post them, record outcomes.

It runs as a task of its own beside the mail worker, with its own few connections, so a slow
or hanging receiver holds only webhook slots and never a mail delivery. Claims, leases and
retries are the ones the mail queue uses (gateway/store/leases.py); the schedule is the
Standard Webhooks one: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h (each stretched
by up to a quarter of jitter; over 3 days in all), then the delivery fails. 2xx is success;
410 Gone disables the endpoint; 429 and 503 wait as long as `Retry-After` says (capped at a
day); anything else, a timeout (15 s) or a refused connection tries again. An endpoint that
has failed for three days is disabled and the admins are told by mail. Every such number
lives in gateway/webhooks/tunables.py.

Order per message: a delivery is not claimed while an earlier event of the same message to
the same endpoint is still queued, so a CRM sees `delivery.delivered` after
`message.received` even when the first post had to be retried.

A claim takes only as many deliveries as there are free slots, so a lease (a minute) covers
one attempt (at most 15 s plus the name lookup) and needs no heartbeat. No endpoint gets more
than three quarters of the slots, so one receiver that hangs does not stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from gateway.config import Settings
from gateway.outbound.local_mail import enqueue
from gateway.store import journal
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.leases import LeasedQueue, scheduled
from gateway.store.models import (
    Event,
    MessageKind,
    Role,
    User,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    utcnow,
)
from gateway.webhooks import addresses, payloads
from gateway.webhooks.desk import disable_in
from gateway.webhooks.fanout import BATCH, behind, fan_out_batch
from gateway.webhooks.notice import disabled_notice
from gateway.webhooks.tunables import (
    CONCURRENCY,
    ERROR_LIMIT,
    FAILING_LIMIT,
    LEASE,
    RETRY_AFTER_CAP,
    SCHEDULE,
    TIMEOUT,
)

log = logging.getLogger(__name__)

LEASES = LeasedQueue(WebhookDelivery, WebhookDeliveryStatus.QUEUED)


@dataclass(frozen=True)
class Attempt:
    delivery: WebhookDelivery
    endpoint: WebhookEndpoint
    event: Event


@dataclass(frozen=True)
class Answer:
    """What one post got: the HTTP status, or the error met before one; `Retry-After`."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def retry_after(value: str | None, now: datetime, cap: float = RETRY_AFTER_CAP) -> float | None:
    """Seconds a `Retry-After` header asks to wait (a number or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), cap)


def active_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the previous during its grace."""
    keys = [endpoint.secret]
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_until is not None
        and endpoint.previous_secret_until > now
    ):
        keys.append(endpoint.previous_secret)
    return keys


def claimable() -> list[ColumnElement[bool]]:
    """The webhook queue's own claim conditions: an enabled endpoint, and no earlier event
    of the same message to the same endpoint still queued."""
    earlier = aliased(WebhookDelivery)
    return [
        WebhookDelivery.endpoint_id.in_(
            select(WebhookEndpoint.id).where(WebhookEndpoint.enabled.is_(True))
        ),
        ~exists(
            select(earlier.id).where(
                earlier.endpoint_id == WebhookDelivery.endpoint_id,
                earlier.message_id == WebhookDelivery.message_id,
                earlier.status == WebhookDeliveryStatus.QUEUED,
                earlier.event_seq < WebhookDelivery.event_seq,
            )
        ),
    ]


def _crowded(in_flight: Iterable[Attempt], limit: int) -> set[str]:
    """The endpoints with `limit` posts or more under way."""
    counts = Counter(attempt.endpoint.id for attempt in in_flight)
    return {endpoint for endpoint, count in counts.items() if count >= limit}


def _lost(attempt: Attempt) -> None:
    log.warning(
        "webhooks: %s was given up meanwhile or another worker took it over",
        attempt.delivery.id,
    )


def _shared(
    claimed: Sequence[Attempt], in_flight: Iterable[Attempt], limit: int
) -> tuple[list[Attempt], list[Attempt]]:
    """The claimed attempts to start, and those to hand back so that no endpoint has more
    than `limit` posts under way."""
    counts = Counter(attempt.endpoint.id for attempt in in_flight)
    keep: list[Attempt] = []
    spare: list[Attempt] = []
    for attempt in claimed:
        counts[attempt.endpoint.id] += 1
        (keep if counts[attempt.endpoint.id] <= limit else spare).append(attempt)
    return keep, spare


class WebhookWorker:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        notify_mail: Callable[[], None],
        clock: Callable[[], datetime] = utcnow,
        *,
        concurrency: int = CONCURRENCY,
        timeout: float = TIMEOUT,
        schedule: Sequence[float] = SCHEDULE,
    ) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.notify_mail = notify_mail
        self.clock = clock
        self.concurrency = concurrency
        self.timeout = timeout
        self.schedule = tuple(schedule)
        # A receiver that hangs may hold most slots, never all: the others keep posting.
        self.per_endpoint = max(1, concurrency * 3 // 4)
        self.name = f"{settings.server.hostname}:{os.getpid()}:{secrets.token_hex(3)}:webhooks"

    # -- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Fan out and post until `stop`; no more posts at once than `concurrency`.

        Posts run as tasks; whenever some finish, their outcomes are recorded together and
        the free slots are filled again, so a hanging receiver holds its slot only. At the
        stop, posts still under way are abandoned and their deliveries released.
        """
        sending: dict[asyncio.Task[tuple[Attempt, Answer]], Attempt] = {}
        stopped = asyncio.ensure_future(stop.wait())
        async with self._clients() as clients:
            try:
                while not stop.is_set():
                    try:
                        await self.fan_out()
                        room = self.concurrency - len(sending)
                        busy = _crowded(sending.values(), self.per_endpoint)
                        claimed = await self._claim(room, busy) if room > 0 else []
                        keep, spare = _shared(claimed, sending.values(), self.per_endpoint)
                        if spare:
                            await self._release([attempt.delivery.id for attempt in spare])
                        for attempt in keep:
                            client = clients[attempt.endpoint.allow_private]
                            sending[asyncio.create_task(self._post(client, attempt))] = attempt
                    except Exception:
                        log.exception("webhooks: a round failed; trying again shortly")
                    await asyncio.wait(
                        {*sending, stopped},
                        timeout=self.settings.worker.poll_seconds,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    finished = {task for task in sending if task.done()}
                    for task in finished:
                        del sending[task]
                    await self._record_finished(finished)
            finally:
                stopped.cancel()
                for task in sending:
                    task.cancel()
                await asyncio.gather(*sending, return_exceptions=True)
                await self._record_finished({t for t in sending if not t.cancelled()})
                abandoned = [sending[t].delivery.id for t in sending if t.cancelled()]
                if abandoned:
                    await self._release(abandoned)

    async def _record_finished(self, finished: set[asyncio.Task[tuple[Attempt, Answer]]]) -> None:
        outcomes = []
        for task in finished:
            if task.exception() is not None:
                log.error("webhooks: a post failed", exc_info=task.exception())
            else:
                outcomes.append(task.result())
        try:
            await self._record(outcomes)
        except Exception:
            # The leases run out and the deliveries are tried again: at least once.
            log.exception("webhooks: recording %d outcomes failed", len(outcomes))

    async def _release(self, ids: list[str]) -> None:
        """Hand back deliveries whose posts were abandoned at a stop: any worker may retry."""
        try:
            async with self.db.transaction() as session:
                await LEASES.release(session, ids, self.name)
        except Exception:
            log.exception(
                "webhooks: releasing %d deliveries failed; their leases run out", len(ids)
            )

    async def run_once(self) -> int:
        """One round by this worker's clock: fan out everything, post what is due (all of it,
        `concurrency` at a time). How many deliveries it attempted."""
        await self.fan_out()
        attempted = 0
        async with self._clients() as clients:
            slots = asyncio.Semaphore(self.concurrency)

            async def one(attempt: Attempt) -> tuple[Attempt, Answer]:
                async with slots:
                    return await self._post(clients[attempt.endpoint.allow_private], attempt)

            while claimed := await self._claim(BATCH):
                await self._record(await asyncio.gather(*(one(a) for a in claimed)))
                attempted += len(claimed)
        return attempted

    async def fan_out(self) -> int:
        """Fan out every event after the cursor, a batch per transaction; how many."""
        async with self.db.snapshot() as session:
            if not await behind(session):
                return 0
        total = 0
        while True:
            async with self.db.transaction() as session:
                count = await fan_out_batch(session, self.clock())
            total += count
            if count < BATCH:
                return total

    @contextlib.asynccontextmanager
    async def _clients(self) -> AsyncIterator[dict[bool, aiohttp.ClientSession]]:
        """Two HTTP clients: one that connects to public addresses only, one for endpoints
        that allow private ones. Neither follows redirects, keeps cookies or reads proxies
        from the environment."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        guarded = aiohttp.TCPConnector(resolver=addresses.GuardedResolver(), use_dns_cache=False)
        async with (
            aiohttp.ClientSession(
                connector=guarded, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
            ) as public,
            aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as private,
        ):
            yield {False: public, True: private}

    # -- one attempt -------------------------------------------------------------------------

    async def _claim(self, limit: int, busy: Collection[str] = ()) -> list[Attempt]:
        """Due deliveries leased to this worker, none to the endpoints in `busy`."""
        async with self.db.snapshot() as session:  # a read first: idle polls write nothing
            due = await session.scalar(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.status == WebhookDeliveryStatus.QUEUED,
                    WebhookDelivery.next_attempt_at <= self.clock(),
                )
                .limit(1)
            )
        if due is None:
            return []
        async with self.db.transaction() as session:
            conditions = claimable()
            if busy:
                conditions.append(WebhookDelivery.endpoint_id.not_in(list(busy)))
            ids = await LEASES.claim(session, self.name, self.clock(), LEASE, limit, *conditions)
            if not ids:
                return []
            rows = await session.execute(
                select(WebhookDelivery, WebhookEndpoint, Event)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .join(Event, Event.seq == WebhookDelivery.event_seq)
                .where(WebhookDelivery.id.in_(ids))
                .order_by(WebhookDelivery.event_seq)
                .execution_options(populate_existing=True)
            )
            return [Attempt(d, e, ev) for d, e, ev in rows]

    async def _post(
        self, client: aiohttp.ClientSession, attempt: Attempt
    ) -> tuple[Attempt, Answer]:
        return attempt, await self._answer(client, attempt)

    async def _answer(self, client: aiohttp.ClientSession, attempt: Attempt) -> Answer:
        endpoint, event = attempt.endpoint, attempt.event
        now = self.clock()
        body = payloads.body(event, thin=endpoint.thin)
        headers = payloads.headers(
            active_secrets(endpoint, now), attempt.delivery.event_seq, now, body
        )
        try:
            # Resolved again at each delivery: DNS may have changed since the endpoint was made.
            await addresses.check(endpoint.url, allow_private=endpoint.allow_private)
            async with client.post(
                endpoint.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.content.readany()  # a little of the body, never all of it
                return Answer(
                    response.status,
                    None if 200 <= response.status < 300 else f"HTTP {response.status}",
                    retry_after(response.headers.get("Retry-After"), now)
                    if response.status in (429, 503)
                    else None,
                )
        except addresses.EndpointUrlError as exc:
            return Answer(None, f"refused: {exc}")
        except TimeoutError:
            return Answer(None, f"no answer within {self.timeout:g} s")
        except aiohttp.ClientError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}")

    async def _record(self, outcomes: Sequence[tuple[Attempt, Answer]]) -> None:
        """Record the outcomes of finished posts, all in one transaction (one commit, one
        fsync on SQLite, for as many posts as finished together)."""
        if not outcomes:
            return
        now = self.clock()
        jitter = random.random()
        settled: list[tuple[Attempt, Answer, str]] = []
        notices = False
        delivered: dict[int, list[tuple[Attempt, Answer]]] = defaultdict(list)
        others: list[tuple[Attempt, Answer]] = []
        for attempt, answer in outcomes:
            if answer.delivered and answer.status is not None:
                delivered[answer.status].append((attempt, answer))
            else:
                others.append((attempt, answer))
        async with self.db.transaction() as session:
            # The usual case in few statements: successes settled together per status code.
            for status, group in delivered.items():
                done = await LEASES.settle_many(
                    session,
                    [attempt.delivery.id for attempt, _ in group],
                    self.name,
                    status=WebhookDeliveryStatus.DELIVERED,
                    attempts=WebhookDelivery.attempts + 1,
                    last_status_code=status,
                    last_error=None,
                    updated_at=now,
                )
                for attempt, answer in group:
                    if attempt.delivery.id in done:
                        settled.append((attempt, answer, "delivered"))
                    else:
                        _lost(attempt)
            succeeded = {a.delivery.endpoint_id for a, _, o in settled}
            if succeeded:
                await session.execute(
                    update(WebhookEndpoint)
                    .where(
                        WebhookEndpoint.id.in_(succeeded),
                        WebhookEndpoint.failing_since.is_not(None),
                    )
                    .values(failing_since=None),
                    execution_options={"synchronize_session": False},
                )
            endpoints: dict[str, WebhookEndpoint | None] = {}
            for attempt, answer in others:
                key = attempt.delivery.endpoint_id
                if key not in endpoints:
                    endpoints[key] = await session.get(WebhookEndpoint, key, with_for_update=True)
                outcome = await self._settle(session, endpoints[key], attempt, answer, now, jitter)
                if outcome is not None:
                    settled.append((attempt, answer, outcome))
            for endpoint in endpoints.values():
                if (
                    endpoint is not None
                    and endpoint.enabled
                    and endpoint.failing_since is not None
                    and now - endpoint.failing_since >= FAILING_LIMIT
                ):
                    last = next(
                        (
                            a
                            for t, a, o in reversed(settled)
                            if o != "delivered" and t.delivery.endpoint_id == endpoint.id
                        ),
                        Answer(None),
                    )
                    notices = await self._give_up(session, endpoint, last, now) or notices
        if notices:
            self.notify_mail()
        for attempt, answer, outcome in settled:
            log.info(
                "webhook %s: to=<%s>, attempt=%d, code=%s, status=%s%s",
                payloads.webhook_id(attempt.delivery.event_seq),
                attempt.endpoint.url,
                attempt.delivery.attempts + 1,
                answer.status if answer.status is not None else "-",
                outcome,
                f" ({answer.error})" if answer.error else "",
            )

    async def _settle(
        self,
        session: AsyncSession,
        endpoint: WebhookEndpoint | None,
        attempt: Attempt,
        answer: Answer,
        now: datetime,
        jitter: float,
    ) -> str | None:
        """Record one outcome in `session`: delivered, deferred or failed; None when the
        delivery was given up meanwhile (its endpoint disabled) or another worker holds it."""
        delivery = attempt.delivery
        count = delivery.attempts + 1
        values: dict[str, object] = {
            "attempts": count,
            "last_status_code": answer.status,
            "last_error": (answer.error or "")[:ERROR_LIMIT] or None,
            "updated_at": now,
        }
        wait = scheduled(count, self.schedule, jitter)
        if answer.delivered:
            outcome, values["status"] = "delivered", WebhookDeliveryStatus.DELIVERED
        elif answer.status == 410 or wait is None:
            outcome, values["status"] = "failed", WebhookDeliveryStatus.FAILED
        else:
            if answer.retry_after is not None:
                wait = timedelta(seconds=answer.retry_after)
            outcome, values["next_attempt_at"] = "deferred", now + wait
        if not await LEASES.settle(session, delivery.id, self.name, **values):
            _lost(attempt)
            return None
        if endpoint is None:
            return outcome
        if answer.delivered:
            endpoint.failing_since = None
        elif answer.status == 410 and endpoint.enabled:
            reason = "the receiver answered 410 Gone"
            event = await disable_in(session, endpoint, reason, "relay", now)
            await journal.append(session, [event], now)
        else:
            endpoint.failing_since = endpoint.failing_since or now
        return outcome

    async def _give_up(
        self, session: AsyncSession, endpoint: WebhookEndpoint, answer: Answer, now: datetime
    ) -> bool:
        """Disable an endpoint failing for days and queue a notice to each admin; whether any
        mail was queued."""
        failing_since = endpoint.failing_since or now
        days = FAILING_LIMIT.days
        reason = f"no event was accepted for {days} days"
        events = [await disable_in(session, endpoint, reason, "relay", now)]
        admins = (
            await session.scalars(
                select(User).where(User.role == Role.ADMIN, User.disabled.is_(False))
            )
        ).all()
        for admin in admins:
            mail = disabled_notice(
                endpoint,
                admin=admin.email,
                days=days,
                last_error=answer.error or "",
                failing_since=failing_since,
                language=self.settings.policy.language,
            )
            queued = await enqueue(
                session,
                self.blobs,
                self.settings,
                mail,
                kind=MessageKind.CONFIRMATION,
                user_id=admin.id,
                now=now,
            )
            events += queued.events
        if not admins:
            log.warning("webhooks: endpoint %s disabled and no admin to tell", endpoint.id)
        await journal.append(session, events, now)
        return bool(admins)
