"""The delivery worker: claim due copies, send them upstream, record each outcome.

Copies of one message that share a blob, a route (gateway/outbound/routes.py) and a
destination leave in one SMTP transaction, prepared and signed once; its outcomes are recorded
as soon as the upstream has answered, before the worker slot is given up. At most
`[worker] concurrency` groups are sent or waiting for their outcomes' commit at once, and at
most `destination_concurrency` of them are in conversation with one destination
(gateway/outbound/destination_gates.py). Temporary failures retry with backoff until the
copy's queue lifetime runs out; then, or at once on a permanent failure, the copy bounces
and the agent gets a DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import secrets
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.agent_logins import AgentLogins, LoginKeyMissing, LoginUnreadable
from gateway.config import Settings
from gateway.mail.loop_mark import LoopMarks
from gateway.mail.outgoing import Signer
from gateway.mail.own_mail import OwnMail
from gateway.outbound import dsn, queue
from gateway.outbound.destination_gates import DestinationGates
from gateway.outbound.local_mail import prepare as prepare_own_mail
from gateway.outbound.queue_signal import QueueSignal
from gateway.outbound.routes import Route, RouteTable
from gateway.outbound.smtp_connection import SourceFailed
from gateway.outbound.stored_copy import keep, outgoing
from gateway.outbound.upstream import Destination, Outcome, SmtpUpstream, relay_name
from gateway.store import group_commit
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.db import Database
from gateway.store.events import DELIVERY_BOUNCED, DELIVERY_DEFERRED, DELIVERY_DELIVERED
from gateway.store.metrics import DELIVERY_OUTCOMES
from gateway.store.models import Delivery, Message, MessageKind, utcnow

log = logging.getLogger(__name__)

_LOGGED_STATUS = {
    DELIVERY_DELIVERED.name: "sent",
    DELIVERY_DEFERRED.name: "deferred",
    DELIVERY_BOUNCED.name: "bounced",
}
_ENHANCED_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
AGENT_LOGIN = "agent-login"  # the delivered event's route when the agent's own login was used
# Copies held waiting for a busy destination, at most this many batches: claims go on past
# them for other destinations until then (Postfix's qmgr_message_active_limit, in small).
WAITING_BATCHES = 20


@dataclass(frozen=True)
class Failure:
    delivery: Delivery
    outcome: Outcome
    status: str


class DeliveryWorker:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        routes: RouteTable,
        signer: Signer,
        signal: QueueSignal,
        clock: Callable[[], datetime] = utcnow,
        loop: LoopMarks | None = None,
        logins: AgentLogins | None = None,
    ) -> None:
        self.settings = settings
        self.logins = logins
        # user id -> (the login's updated_at, an upstream that logs in with it)
        self._login_upstreams: dict[int, tuple[datetime, Route]] = {}
        self.db = db
        self.blobs = blobs
        self.routes = routes
        self.signer = signer
        self.loop = loop
        self.signal = signal
        self.clock = clock
        self.name = f"{settings.server.hostname}:{os.getpid()}:{secrets.token_hex(3)}"
        self._slots = asyncio.Semaphore(settings.worker.concurrency)
        self.destinations = DestinationGates(settings.worker.destination_concurrency)
        # claimed here and not yet recorded (the heartbeat's list), with the claim's time
        self._held: dict[str, datetime] = {}
        self._waiting = 0  # of those, copies waiting for their destination's turn
        self._closings: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim due copies whenever there is room and send each group as a task of its own.

        No round waits for its slowest conversation: a stalled upstream holds one slot until
        its deadline while the other copies keep leaving. Leases of held copies are renewed.
        """
        heartbeat = asyncio.create_task(self._renew_leases())
        sending: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                try:
                    started = await self._start_due(sending, stop)
                except Exception:
                    log.exception("claiming due copies failed; trying again shortly")
                    started = 0
                if not started:
                    await self.signal.wait(self.settings.worker.poll_seconds)
        finally:
            await asyncio.gather(*sending, return_exceptions=True)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def run_once(self) -> int:
        """One round: claim what is due and deliver it. Returns how many copies it handled."""
        claimed = await self._claim(self.settings.worker.batch_size)
        groups = _groups(claimed, self._route_for)
        await asyncio.gather(*(self._deliver(route, group) for route, group in groups))
        return len(claimed)

    async def _start_due(self, sending: set[asyncio.Task[None]], stop: asyncio.Event) -> int:
        """Claim up to the room left in the batch; a task per group. How many were claimed.

        Copies waiting for a busy destination do not count against the batch (up to
        WAITING_BATCHES of them): a burst to one destination does not stop the claims of
        copies for others."""
        batch = self.settings.worker.batch_size
        ready = len(self._held) - self._waiting
        room = min(batch - ready, batch * WAITING_BATCHES - self._waiting)
        if room <= 0:
            return 0
        claimed = await self._claim(room)
        for route, group in _groups(claimed, self._route_for):
            task = asyncio.create_task(self._deliver(route, group, stop))
            sending.add(task)
            task.add_done_callback(lambda done: self._finished(done, sending))
        return len(claimed)

    def _finished(self, task: asyncio.Task[None], sending: set[asyncio.Task[None]]) -> None:
        sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivering a group failed", exc_info=task.exception())
        self.signal.notify()  # room for more claims

    async def _claim(self, limit: int) -> list[queue.Claimed]:
        """Due copies, leased to this worker; never one it already holds (its lease ran out
        while it waited for a slot, and the claim just renewed it)."""
        lease = timedelta(seconds=self.settings.worker.lease_seconds)
        now = self.clock()
        claimed = await group_commit.submit(
            self.db, queue.Claim(self.name, now, lease, limit), linger=True
        )
        fresh = [item for item in claimed if item.delivery.id not in self._held]
        self._held.update((item.delivery.id, now) for item in fresh)
        return fresh

    async def _renew_leases(self) -> None:
        """The heartbeat: every third of a lease, extend the leases of every copy held."""
        seconds = self.settings.worker.lease_seconds
        while True:
            await asyncio.sleep(seconds / 3)
            if not self._held:
                continue
            try:
                async with self.db.transaction() as session:
                    await queue.renew(
                        session,
                        set(self._held),
                        self.name,
                        self.clock(),
                        timedelta(seconds=seconds),
                    )
            except Exception:
                log.exception("renewing leases failed; trying again at the next beat")

    def _route_for(self, item: queue.Claimed) -> Route:
        """Where this copy goes, decided at each attempt: queued mail follows the settings."""
        return self.routes.route_for(item.message, item.delivery.recipient)

    async def _deliver(
        self, route: Route, group: Sequence[queue.Claimed], stop: asyncio.Event | None = None
    ) -> None:
        """Send one group and record its outcomes before giving up the worker slot, so that
        copies sent but not yet recorded (sent again after a crash) are at most the slots.

        The group first waits for its destination's turn, holding no worker slot meanwhile,
        so that groups for other destinations take the slots. The destination's turn ends
        with the send: its connection carries the next copy while this one's outcome waits
        for its commit (that wait paced delivery to one smart host: 10 conversations, each
        idle for a group commit between copies)."""
        ids = [item.delivery.id for item in group]
        self._waiting += len(ids)
        waiting = True
        slot = False
        try:
            route, unusable = await self._route_of(route, group)
            destination = route.upstream.destination(group[0].delivery.recipient)
            async with self.destinations.slot(destination.key, destination.limit):
                self._waiting -= len(ids)
                waiting = False
                await self._slots.acquire()
                slot = True
                if stop is not None and stop.is_set():
                    await self._release(ids)
                    return
                if not self._just_claimed(ids):
                    group = await self._hold(group)
                    if not group:
                        return
                outcomes, signed = unusable or await self._send(route, destination, group)
            await self._record(
                group[0].message, [item.delivery for item in group], outcomes, route, signed
            )
        finally:
            if slot:
                self._slots.release()
            if waiting:
                self._waiting -= len(ids)
            for held in ids:
                self._held.pop(held, None)

    async def _route_of(
        self, route: Route, group: Sequence[queue.Claimed]
    ) -> tuple[Route, tuple[dict[str, Outcome], None] | None]:
        """The route the group takes: the agent's own login, when they have one, before the
        table's; with the group's outcomes already when that login cannot be used."""
        message = group[0].message
        recipients = [item.delivery.recipient for item in group]
        try:
            return await self._agent_login_for(message, group[0].login_changed) or route, None
        except (LoginKeyMissing, LoginUnreadable) as exc:  # their texts hold no secret
            log.error("%s: the agent's upstream login cannot be used: %s", message.id, exc)
            return route, (dict.fromkeys(recipients, Outcome(f"agent login unusable: {exc}")), None)
        except Exception as exc:
            return route, (_local_error(message.id, recipients, exc), None)

    def _just_claimed(self, ids: Sequence[str]) -> bool:
        """Whether this worker claimed all these copies less than a third of a lease ago.

        Their leases then have two thirds left, the margin the heartbeat itself keeps, so no
        other worker can have taken them: the copies leave without a `_hold`, which cost
        every copy a wait for a commit of its own (15 % of small-mail throughput).
        """
        fresh = self.clock() - timedelta(seconds=self.settings.worker.lease_seconds / 3)
        return all(self._held.get(held, fresh) > fresh for held in ids)

    async def _hold(self, group: Sequence[queue.Claimed]) -> list[queue.Claimed]:
        """The copies of `group` this worker still holds, each leased for `lease_seconds`
        from now; the heartbeat keeps them while they are in flight.

        A heartbeat late by a lease (a loaded host, a database that answers slowly) let
        another process claim copies waiting here for a slot, and both sent them: 73 copies
        twice in a loaded bench with a 1 s lease. A copy is now sent only if its lease is
        still this worker's just before it leaves."""
        ids = [item.delivery.id for item in group]
        lease = timedelta(seconds=self.settings.worker.lease_seconds)
        held = await group_commit.submit(self.db, queue.Hold(self.name, ids, self.clock() + lease))
        lost = [i for i in ids if i not in held]
        if lost:
            log.warning("leases on %s ran out and another worker took them", ", ".join(lost))
        return [item for item in group if item.delivery.id in held]

    async def _send(
        self, route: Route, destination: Destination, group: Sequence[queue.Claimed]
    ) -> tuple[dict[str, Outcome], str | None]:
        """The upstream's outcome per recipient, and the digest of the signed bytes when a
        copy of the group keeps them (stored before they leave, so that a copy recorded as
        delivered always has them: a released original's evidence is what the recipient got).
        The outcomes tell the destination's gate how it went."""
        message = group[0].message
        deliveries = [item.delivery for item in group]
        recipients = [d.recipient for d in deliveries]
        signed = None
        hostname = self.settings.server.hostname
        try:
            # A big copy is read from the store as it leaves (gateway/outbound/stored_copy.py)
            async with outgoing(
                self.blobs, deliveries[0].blob, message, hostname, self.signer, self.loop
            ) as data:
                if any(d.keep_signed for d in deliveries):
                    signed = await keep(data, self.blobs)
                outcomes = await route.upstream.send(message.sender, recipients, data)
        except Exception as exc:
            # A store that failed while the copy was sent closed the connection before the
            # data's end: nothing was delivered.
            cause = exc.__cause__ if isinstance(exc, SourceFailed) else exc
            if isinstance(cause, StoreUnavailable):  # deferred: retried, never bounced
                log.warning("%s: deferred, blob store unavailable: %s", message.id, cause)
                unavailable = Outcome(f"blob store unavailable: {cause}", store_unavailable=True)
                return dict.fromkeys(recipients, unavailable), None
            return _local_error(message.id, recipients, exc), None
        if all(not o.delivered and not o.permanent for o in outcomes.values()):
            self.destinations.failed(destination.key)
        else:
            self.destinations.succeeded(destination.key)
        return outcomes, signed

    async def _agent_login_for(self, message: Message, changed: datetime | None) -> Route | None:
        """The agent's own login as a route and upstream, for mail the agent sent (their
        submissions, released originals); never for the relay's own mail to them. One
        upstream per user, made again when their login changed (`changed`, read with the
        claim)."""
        if self.logins is None or message.kind != MessageKind.SUBMITTED or not message.user_id:
            return None
        user_id = message.user_id
        if changed is None:
            if (gone := self._login_upstreams.pop(user_id, None)) is not None:
                self._closing(gone[1].upstream.close())
            return None
        cached = self._login_upstreams.get(user_id)
        if cached is None or cached[0] != changed:
            login = await self.logins.open(user_id)
            if login is None:
                return None
            upstream = SmtpUpstream(
                self.settings.upstream,
                self.settings.server.hostname,
                url=login.url,
                login=(login.username, login.password),
            )
            relay = f"{AGENT_LOGIN} {relay_name(login.url)}"
            replaced = self._login_upstreams.get(user_id)
            cached = (login.updated_at, Route(AGENT_LOGIN, AGENT_LOGIN, upstream, relay))
            self._login_upstreams[user_id] = cached
            if replaced is not None:  # its kept connections log in with the old password
                self._closing(replaced[1].upstream.close())
        return cached[1]

    def _closing(self, closing: Coroutine[Any, Any, None]) -> None:
        """Close an agent's former upstream in the background; close() waits for it."""
        task = asyncio.create_task(closing)
        self._closings.add(task)
        task.add_done_callback(self._closings.discard)

    async def close(self) -> None:
        """QUIT on every kept upstream connection (routes and agents' logins); after run()."""
        logins = [route.upstream.close() for _, route in self._login_upstreams.values()]
        self._login_upstreams.clear()
        await asyncio.gather(self.routes.close(), *logins, *self._closings)

    async def _release(self, ids: Sequence[str]) -> None:
        async with self.db.transaction() as session:
            await queue.release(session, ids, self.name)

    async def _record(
        self,
        message: Message,
        deliveries: Sequence[Delivery],
        outcomes: dict[str, Outcome],
        route: Route,
        signed: str | None = None,
    ) -> None:
        now = self.clock()
        failures = []
        for delivery in deliveries:
            outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
            if outcome.delivered:
                continue
            if outcome.permanent:
                failures.append(Failure(delivery, outcome, _status_of(outcome.error, "5.0.0")))
            elif now >= delivery.expires_at and not outcome.store_unavailable:
                lifetime = _duration(self.settings.upstream.queue_lifetime)
                gave_up = f"gave up after {lifetime}; last error: {outcome.error}"
                failures.append(Failure(delivery, Outcome(gave_up, True), "4.4.7"))
        bounce = await self._bounce_for(message, failures, now) if failures else None
        failed = {f.delivery.id: f for f in failures}

        # One draw for the batch: copies deferred together stay due together, and so leave
        # in one transaction again instead of one per recipient.
        jitter = random.random()
        attempts = []
        for delivery in deliveries:
            outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
            if outcome.delivered:
                attempt = queue.delivered(delivery, outcome.remote_mta, signed, route=route.name)
            elif delivery.id in failed:
                given_up = failed[delivery.id]
                attempt = queue.bounced(
                    delivery, given_up.outcome.error or "", status=given_up.status, route=route.name
                )
            else:
                next_attempt = self._next_attempt(delivery, now, jitter, outcome.store_unavailable)
                attempt = queue.deferred(
                    delivery, outcome.error or "", next_attempt, route=route.name
                )
            attempts.append(attempt)
        # The DSN is rendered and stored before the shared transaction; it is queued only if
        # a copy of it really bounced here (not when another worker took the lease over).
        dsn_mail = (
            await prepare_own_mail(
                self.blobs,
                self.settings,
                bounce,
                kind=MessageKind.BOUNCE,
                user_id=message.user_id,
                now=now,
                bounce_of=message.id,
            )
            if bounce is not None
            else None
        )
        events = await group_commit.submit(
            self.db,
            queue.Settle(
                self.name,
                now,
                attempts,
                dsn_mail.rows if dsn_mail else (),
                dsn_mail.events if dsn_mail else (),
            ),
            linger=True,
        )
        if bounce is not None:
            self.signal.notify()
        for delivery, event in zip(deliveries, events, strict=False):
            if event is None:
                log.warning("lease on %s was lost; another worker records it", delivery.id)
            else:
                DELIVERY_OUTCOMES.labels(outcome=event.type.removeprefix("delivery.")).inc()
                outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
                failure = failed.get(delivery.id)
                self._log_outcome(
                    message,
                    delivery,
                    route,
                    event.type,
                    failure.outcome if failure else outcome,
                    now,
                    failure.status if failure else None,
                )

    def _log_outcome(
        self,
        message: Message,
        delivery: Delivery,
        route: Route,
        event: str,
        outcome: Outcome,
        now: datetime,
        final: str | None = None,
    ) -> None:
        """One line per outcome, as Postfix writes it, under the id the agent got in the 250;
        relay= is where the route's upstream is (the agent's own host when their login was
        used); a bounce's dsn= is the ``final`` status its DSN reports."""
        status = _LOGGED_STATUS[event]
        reply = " ".join((outcome.error or outcome.reply or "").split())
        default = {"sent": "2.0.0", "deferred": "4.0.0"}.get(status, "5.0.0")
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.2f, dsn=%s, status=%s (%s)",
            message.id,
            delivery.recipient,
            outcome.remote_mta if route.relay == "mx:" and outcome.remote_mta else route.relay,
            (now - message.received_at).total_seconds(),
            final or _status_of(reply, default),
            status,
            reply,
        )

    def _next_attempt(
        self, delivery: Delivery, now: datetime, jitter: float, past_lifetime: bool = False
    ) -> datetime:
        upstream = self.settings.upstream
        wait = queue.backoff(delivery.attempts + 1, upstream.retry_base, upstream.retry_max, jitter)
        return now + wait if past_lifetime else min(now + wait, delivery.expires_at)

    async def _bounce_for(
        self, message: Message, failures: Sequence[Failure], now: datetime
    ) -> OwnMail | None:
        """A DSN to the agent, never for a bounce or a null sender (that would loop)."""
        if not message.sender or message.kind == MessageKind.BOUNCE:
            log.info("not bouncing %s: null sender or a bounce itself", message.id)
            return None
        return dsn.dsn_mail(
            reporting_mta=self.settings.server.hostname,
            original=await self.blobs.read(message.blob),
            envelope_sender=message.sender,
            failed=[
                dsn.FailedRecipient(
                    address=f.delivery.recipient,
                    status=f.status,
                    diagnostic=f.outcome.error or "",
                    last_attempt=now,
                    remote_mta=f.outcome.remote_mta,
                )
                for f in failures
            ],
            arrival=message.received_at,
            now=now,
            envelope_id=message.id,
            zone=self.settings.branding.timezone,
            language=self.settings.policy.language,  # the agent's, like the renewal
        )


def _local_error(message_id: str, recipients: list[str], exc: Exception) -> dict[str, Outcome]:
    """Every recipient deferred for a fault of ours before the upstream replied."""
    log.exception("delivering %s failed before a reply", message_id)
    return dict.fromkeys(recipients, Outcome(f"local error: {exc}"))


def _groups(
    claimed: Sequence[queue.Claimed], route_for: Callable[[queue.Claimed], Route]
) -> list[tuple[Route, list[queue.Claimed]]]:
    """Copies of one message that share a blob, a route and a destination (direct
    delivery: a recipient domain) leave in one SMTP transaction."""
    groups: dict[tuple[str, str, str, Hashable], tuple[Route, list[queue.Claimed]]] = {}
    for item in claimed:
        route = route_for(item)
        destination = route.upstream.destination(item.delivery.recipient).key
        key = (item.message.id, item.delivery.blob, route.name, destination)
        groups.setdefault(key, (route, []))[1].append(item)
    return list(groups.values())


def _duration(seconds: float) -> str:
    """The queue lifetime as a person says it: "5 days", "1 minute"."""
    units = (("day", 86400), ("hour", 3600), ("minute", 60))
    unit, size = next(((u, n) for u, n in units if seconds >= n), ("second", 1))
    amount = f"{seconds / size:.3g}"
    return f"{amount} {unit}" if amount == "1" else f"{amount} {unit}s"


def _status_of(reply: str | None, default: str) -> str:
    match = _ENHANCED_STATUS.search(reply or "")
    return match.group(1) if match else default
