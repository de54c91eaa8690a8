"""The delivery worker: claim due copies, send them upstream, record each outcome.

Copies of one message that share a blob leave in one SMTP transaction, prepared and signed
once. Temporary failures retry with backoff until the copy's queue lifetime runs out; then,
or at once on a permanent failure, the copy bounces and the agent gets a DSN.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway import dsn, journal, queue
from gateway.blobstore import BlobStore
from gateway.config import Settings
from gateway.db import Database
from gateway.local_mail import compose_queued, own_sender
from gateway.metrics import DELIVERY_OUTCOMES
from gateway.models import Delivery, Message, MessageKind, utcnow
from gateway.outgoing import Signer, prepare
from gateway.pipeline import QueueSignal
from gateway.upstream import Outcome, Upstream, relay_name

log = logging.getLogger(__name__)

_LOGGED_STATUS = {
    "delivery.delivered": "sent",
    "delivery.deferred": "deferred",
    "delivery.bounced": "bounced",
}
_ENHANCED_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


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
        upstream: Upstream,
        signer: Signer,
        signal: QueueSignal,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.upstream = upstream
        self.signer = signer
        self.signal = signal
        self.clock = clock
        self.name = f"{settings.server.hostname}:{os.getpid()}:{secrets.token_hex(3)}"
        self._slots = asyncio.Semaphore(settings.worker.concurrency)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("delivery round failed; trying again shortly")
                handled = 0
            if not handled:
                await self.signal.wait(self.settings.worker.poll_seconds)

    async def run_once(self) -> int:
        """One round: claim what is due and deliver it. Returns how many copies it handled."""
        lease = timedelta(seconds=self.settings.worker.lease_seconds)
        async with self.db.transaction() as session:
            claimed = await queue.claim(
                session, self.name, self.clock(), lease, self.settings.worker.batch_size
            )
        groups: dict[tuple[str, str], list[queue.Claimed]] = defaultdict(list)
        for item in claimed:
            groups[(item.message.id, item.delivery.blob)].append(item)
        await asyncio.gather(*(self._deliver(group) for group in groups.values()))
        return len(claimed)

    async def _deliver(self, group: Sequence[queue.Claimed]) -> None:
        message = group[0].message
        deliveries = [item.delivery for item in group]
        recipients = [d.recipient for d in deliveries]
        async with self._slots:
            try:
                # Not kept in a local: the stored bytes are freed once the copy is built.
                data = prepare(
                    await self.blobs.read(deliveries[0].blob),
                    message,
                    self.settings.server.hostname,
                    self.signer,
                )
                outcomes = await self.upstream.send(message.sender, recipients, data)
            except Exception as exc:
                log.exception("delivering %s failed before a reply", message.id)
                outcomes = dict.fromkeys(recipients, Outcome(f"local error: {exc}"))
        await self._record(message, deliveries, outcomes)

    async def _record(
        self, message: Message, deliveries: Sequence[Delivery], outcomes: dict[str, Outcome]
    ) -> None:
        now = self.clock()
        failures = []
        for delivery in deliveries:
            outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
            if outcome.delivered:
                continue
            if outcome.permanent:
                failures.append(Failure(delivery, outcome, _status_of(outcome.error, "5.0.0")))
            elif now >= delivery.expires_at:
                lifetime = _duration(self.settings.upstream.queue_lifetime)
                gave_up = f"gave up after {lifetime}; last error: {outcome.error}"
                failures.append(Failure(delivery, Outcome(gave_up, True), "4.4.7"))
        bounce = await self._bounce_for(message, failures, now) if failures else None
        failed = {f.delivery.id: f for f in failures}

        # One draw for the batch: copies deferred together stay due together, and so leave
        # in one transaction again instead of one per recipient.
        jitter = random.random()
        events: list[journal.NewEvent | None] = []
        async with self.db.transaction() as session:
            for delivery in deliveries:
                outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
                if outcome.delivered:
                    events.append(
                        await queue.mark_delivered(
                            session, delivery, self.name, now, outcome.remote_mta
                        )
                    )
                elif delivery.id in failed:
                    events.append(
                        await queue.mark_bounced(
                            session,
                            delivery,
                            self.name,
                            now,
                            failed[delivery.id].outcome.error or "",
                        )
                    )
                else:
                    events.append(
                        await queue.mark_deferred(
                            session,
                            delivery,
                            self.name,
                            now,
                            outcome.error or "",
                            self._next_attempt(delivery, now, jitter),
                        )
                    )
            bounced_now = any(e is not None and e.type == "delivery.bounced" for e in events)
            if bounce is not None and bounced_now:
                bounce_message, bounce_delivery = bounce
                session.add(bounce_message)
                await session.flush()
                session.add(bounce_delivery)
                events.append(
                    journal.NewEvent(
                        "bounce.queued",
                        bounce_message.id,
                        bounce_delivery.id,
                        {"original": message.id, "recipient": bounce_delivery.recipient},
                    )
                )
            await journal.append(session, [e for e in events if e is not None], now)
        if bounce is not None:
            self.signal.notify()
        for delivery, event in zip(deliveries, events, strict=False):
            if event is None:
                log.warning("lease on %s was lost; another worker records it", delivery.id)
            else:
                DELIVERY_OUTCOMES.labels(outcome=event.type.removeprefix("delivery.")).inc()
                outcome = outcomes.get(delivery.recipient, Outcome("no reply for this recipient"))
                if delivery.id in failed:
                    outcome = failed[delivery.id].outcome
                self._log_outcome(message, delivery, event.type, outcome, now)

    def _log_outcome(
        self, message: Message, delivery: Delivery, event: str, outcome: Outcome, now: datetime
    ) -> None:
        """One line per outcome, as Postfix writes it, under the id the agent got in the 250."""
        status = _LOGGED_STATUS[event]
        reply = " ".join((outcome.error or outcome.reply or "").split())
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.2f, dsn=%s, status=%s (%s)",
            message.id,
            delivery.recipient,
            relay_name(self.settings.upstream.url),
            (now - message.received_at).total_seconds(),
            _status_of(reply, {"sent": "2.0.0", "deferred": "4.0.0"}.get(status, "5.0.0")),
            status,
            reply,
        )

    def _next_attempt(self, delivery: Delivery, now: datetime, jitter: float) -> datetime:
        upstream = self.settings.upstream
        wait = queue.backoff(delivery.attempts + 1, upstream.retry_base, upstream.retry_max, jitter)
        return min(now + wait, delivery.expires_at)

    async def _bounce_for(
        self, message: Message, failures: Sequence[Failure], now: datetime
    ) -> tuple[Message, Delivery] | None:
        """A DSN to the agent, never for a bounce or a null sender (that would loop)."""
        if not message.sender or message.kind == MessageKind.BOUNCE:
            log.info("not bouncing %s: null sender or a bounce itself", message.id)
            return None
        hostname = self.settings.server.hostname
        original = await self.blobs.read(message.blob)
        report = dsn.build_dsn(
            reporting_mta=hostname,
            original=original,
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
            sender=own_sender(self.settings, message.sender, "MAILER-DAEMON"),
            zone=self.settings.branding.timezone,
            language=self.settings.policy.language or "de",  # the agent's, like the renewal
        )
        bounce, [delivery] = await compose_queued(
            self.blobs,
            report,
            kind=MessageKind.BOUNCE,
            user_id=message.user_id,
            recipients=[message.sender],
            now=now,
            lifetime=self.settings.upstream.queue_lifetime,
        )
        return bounce, delivery


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} seconds"


def _status_of(reply: str | None, default: str) -> str:
    match = _ENHANCED_STATUS.search(reply or "")
    return match.group(1) if match else default
