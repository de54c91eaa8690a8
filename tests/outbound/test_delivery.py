"""Delivery: retries, bounces, lifetimes, leases and transports, through a real relay and sink.

Each test that needs a database runs on SQLite and on PostgreSQL. Where timing matters (the
queue lifetime, leases) the relay gets a fake clock and the worker is driven round by round
with `run_once`; elsewhere the relay's own worker runs, retrying fast (relay_settings).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any, TypeVar

import dkim as dkimpy
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from sqlalchemy import select, update

from gateway import users
from gateway.config import Settings
from gateway.intake.pipeline import Envelope as PipelineEnvelope
from gateway.intake.pipeline import Origin
from gateway.mail.dkim import DkimKey
from gateway.mail.outgoing import Signer
from gateway.outbound import queue
from gateway.outbound.delivery import DeliveryWorker
from gateway.store import group_commit
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, Event, MessageKind, new_id, utcnow
from gateway.store.models import Message as MessageRow
from sealrelay.serve import Relay
from tests.conftest import (
    AGENT,
    ALIAS,
    DKIM_DOMAIN,
    DKIM_SELECTOR,
    PASSWORD,
    Harness,
    dkim_dns,
    make_message,
    relay_settings,
)
from tests.support import Sink, free_port

T = TypeVar("T")
WAIT = 20  # seconds: the bound on every wait for the relay to reach a state


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class FakeClock:
    """The worker's clock, moved by hand."""

    now: datetime = field(default_factory=utcnow)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = WAIT) -> T:
    """Poll `check` with small pauses until it returns something truthy (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.05)


async def _when(value: Awaitable[T], predicate: Callable[[T], bool]) -> T | None:
    """`value` once it satisfies `predicate`, else None: a check for `eventually`."""
    result = await value
    return result if predicate(result) else None


async def deliveries(db: Database, message_id: str | None = None) -> list[Delivery]:
    query = select(Delivery).order_by(Delivery.recipient)
    if message_id is not None:
        query = query.where(Delivery.message_id == message_id)
    async with db.transaction() as session:
        return list((await session.scalars(query)).all())


async def delivery_to(db: Database, recipient: str, message_id: str | None = None) -> Delivery:
    [found] = [d for d in await deliveries(db, message_id) if d.recipient == recipient]
    return found


async def events(db: Database, *types: str) -> list[Event]:
    query = select(Event).order_by(Event.id)
    if types:
        query = query.where(Event.type.in_(types))
    async with db.transaction() as session:
        return list((await session.scalars(query)).all())


async def bounce_messages(db: Database) -> list[MessageRow]:
    async with db.transaction() as session:
        query = select(MessageRow).where(MessageRow.kind == MessageKind.BOUNCE)
        return list((await session.scalars(query)).all())


def all_in(states: Collection[str], rows: list[Delivery]) -> bool:
    return bool(rows) and all(d.status in states for d in rows)


def queued_id(reply: str) -> str:
    assert reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[-1]


def parse_dsn(data: bytes) -> tuple[EmailMessage, Message, list[Message]]:
    """The DSN, its per-message status block and one block per failed recipient."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return msg, blocks[0], blocks[1:]


def unfolded(value: str | None) -> str:
    assert value is not None
    return " ".join(value.split())


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


StartRelay = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_relay(
    database: Database,
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    dkim_key: DkimKey,
    dkim_key_file: Path,
) -> AsyncIterator[StartRelay]:
    """Start relays with chosen settings, clock and roles; all are stopped at the end."""
    cert, key = tls_files
    await users.add_user(database, AGENT, PASSWORD, aliases=(ALIAS,))
    started: list[Relay] = []

    async def start(
        sink: Sink,
        *,
        clock: Callable[[], datetime] = utcnow,
        roles: Collection[str] = ("smtp", "worker"),
        settings: Settings | None = None,
        **sections: dict[str, Any],
    ) -> Harness:
        signer = None  # a relay given its settings loads the keys they name
        if settings is None:
            signer = Signer({DKIM_DOMAIN: dkim_key})
            smtp = {"tls_cert": str(cert), "tls_key": str(key), **sections.pop("smtp", {})}
            settings = relay_settings(
                tmp_path,
                sink.port,
                smtp=smtp,
                dkim={DKIM_DOMAIN: {"selector": DKIM_SELECTOR, "key_file": str(dkim_key_file)}},
                **sections,
            )
        relay = Relay(settings, db=database, roles=roles, signer=signer, clock=clock)
        await relay.start()
        started.append(relay)
        return Harness(relay, sink, settings, dkim_key)

    yield start
    for relay in started:
        await relay.stop()


# -- backoff (pure) --------------------------------------------------------------------------


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    waits = [queue.backoff(n, 60, 3600).total_seconds() for n in range(1, 10)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert queue.backoff(0, 60, 3600) == timedelta(seconds=60)


@pytest.mark.parametrize("attempts", [1, 3, 7, 50])
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999999])
def test_backoff_jitter_stretches_by_at_most_a_quarter(attempts: int, jitter: float) -> None:
    plain = queue.backoff(attempts, 60, 3600).total_seconds()
    stretched = queue.backoff(attempts, 60, 3600, jitter).total_seconds()
    assert plain <= stretched < plain * 1.25
    assert stretched == pytest.approx(plain * (1 + jitter / 4))


def test_backoff_survives_any_number_of_attempts() -> None:
    """With retry_max = 60 a copy makes ~7,200 attempts in five days; the settings are floats,
    and 2.0 ** 1024 overflows one."""
    for attempts in (1024, 1025, 7200, 10**6):
        assert queue.backoff(attempts, 60.0, 600.0) == timedelta(seconds=600)
        assert queue.backoff(attempts, 60.0, 600.0, 0.5) == timedelta(seconds=675)


# -- temporary failures ----------------------------------------------------------------------


async def test_upstream_down_then_back_delivers_everything(relay: Harness) -> None:
    db, sink = relay.relay.db, relay.sink
    await sink.stop()
    first = queued_id(await relay.send(make_message(to="a@example.com, b@example.org")))
    second = queued_id(await relay.send(make_message(to="c@example.net", subject="Zweites")))

    async def all_deferred() -> bool:
        rows = await deliveries(db)
        return len(rows) == 3 and all(d.attempts >= 1 for d in rows)

    await eventually(all_deferred)
    assert sink.messages == []
    await sink.start(sink.port)

    received = await sink.expect(2)
    assert sorted(sorted(m.rcpt_tos) for m in received) == [
        ["a@example.com", "b@example.org"],
        ["c@example.net"],
    ]
    rows = await eventually(
        lambda: _when(deliveries(db), lambda r: all_in({DeliveryStatus.DELIVERED}, r))
    )
    assert {d.message_id for d in rows} == {first, second}
    for delivery in rows:
        own = [e for e in await events(db) if e.delivery_id == delivery.id]
        types = [e.type for e in own]
        deferred = types.count("delivery.deferred")
        assert types == ["delivery.queued", *["delivery.deferred"] * deferred, "delivery.delivered"]
        assert deferred >= 1
        assert delivery.attempts == deferred + 1
        assert [e.data["attempt"] for e in own[1:]] == list(range(1, delivery.attempts + 1))
        assert f"127.0.0.1:{sink.port}" in own[1].data["error"]
        assert delivery.last_error is None and delivery.leased_by is None
    assert await bounce_messages(db) == []


async def test_4xx_for_one_recipient_retries_only_that_one(relay: Harness) -> None:
    db, sink = relay.relay.db, relay.sink
    sink.refuse["later@example.org"] = "450 4.2.0 try later"
    message_id = queued_id(await relay.send(make_message(to="now@example.com, later@example.org")))

    [first] = await sink.expect(1)
    assert first.rcpt_tos == ["now@example.com"]
    now = await eventually(
        lambda: _when(
            delivery_to(db, "now@example.com"), lambda d: d.status == DeliveryStatus.DELIVERED
        )
    )
    assert now.attempts == 1
    later = await eventually(
        lambda: _when(delivery_to(db, "later@example.org"), lambda d: d.attempts >= 2)
    )
    assert later.status == DeliveryStatus.QUEUED
    assert later.last_error == "450 4.2.0 try later"

    del sink.refuse["later@example.org"]
    _, second = await sink.expect(2)
    assert second.rcpt_tos == ["later@example.org"]
    assert second.data.split(b"\r\n\r\n")[1] == first.data.split(b"\r\n\r\n")[1]
    later = await eventually(
        lambda: _when(
            delivery_to(db, "later@example.org"), lambda d: d.status == DeliveryStatus.DELIVERED
        )
    )
    assert later.attempts >= 3
    assert [d.status for d in await deliveries(db, message_id)] == ["delivered", "delivered"]
    assert await bounce_messages(db) == []
    assert len(sink.messages) == 2


# -- permanent failures and DSNs -------------------------------------------------------------


async def test_5xx_for_one_recipient_bounces_it_with_one_dsn(relay: Harness) -> None:
    db, sink = relay.relay.db, relay.sink
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user"
    message_id = queued_id(await relay.send(make_message(to="ok@example.com, gone@example.org")))

    received = await sink.expect(2)
    [original] = [m for m in received if m.mail_from == AGENT]
    [report] = [m for m in received if m.mail_from == "<>"]
    assert original.rcpt_tos == ["ok@example.com"]
    assert report.rcpt_tos == [AGENT]

    msg, per_message, blocks = parse_dsn(report.data)
    assert [a.addr_spec for a in msg["To"].addresses] == [AGENT]
    # from the agent's domain, which signs
    assert [a.addr_spec for a in msg["From"].addresses] == ["MAILER-DAEMON@broker.example"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert unfolded(per_message["Reporting-MTA"]) == "dns; relay.broker.example"
    assert unfolded(per_message["Original-Envelope-Id"]) == message_id
    [block] = blocks
    assert unfolded(block["Final-Recipient"]) == "rfc822; gone@example.org"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert unfolded(block["Diagnostic-Code"]) == "smtp; 550 5.1.1 no such user"
    assert unfolded(block["Remote-MTA"]) == "dns; 127.0.0.1"
    assert b"ok@example.com" not in parts_bytes(report.data, 1)

    [bounce] = await bounce_messages(db)
    dsn_delivery = await eventually(
        lambda: _when(deliveries(db, bounce.id), lambda r: all_in({DeliveryStatus.DELIVERED}, r))
    )
    assert [d.recipient for d in dsn_delivery] == [AGENT]
    rows = {d.recipient: d for d in await deliveries(db, message_id)}
    assert rows["ok@example.com"].status == DeliveryStatus.DELIVERED
    assert rows["gone@example.org"].status == DeliveryStatus.BOUNCED
    assert rows["gone@example.org"].attempts == 1
    assert rows["gone@example.org"].last_error == "550 5.1.1 no such user"

    [bounced] = await events(db, "delivery.bounced")
    assert bounced.delivery_id == rows["gone@example.org"].id
    assert bounced.data["error"] == "550 5.1.1 no such user"
    [queued] = await events(db, "bounce.queued")
    assert queued.message_id == bounce.id
    assert queued.data == {"original": message_id, "recipient": AGENT}
    delivered = {e.delivery_id for e in await events(db, "delivery.delivered")}
    assert delivered == {rows["ok@example.com"].id, dsn_delivery[0].id}
    assert len(sink.messages) == 2


def parts_bytes(data: bytes, index: int) -> bytes:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return parts[index].as_bytes()


async def test_5xx_after_data_bounces_every_recipient(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    harness = await start_relay(sink, roles=("smtp",))
    worker = harness.relay.worker
    sink.data_reply = "554 5.7.1 rejected"
    message_id = queued_id(await harness.send(make_message(to="a@example.com, b@example.org")))

    assert await worker.run_once() == 2
    assert [d.status for d in await deliveries(database, message_id)] == ["bounced", "bounced"]
    [bounce] = await bounce_messages(database)

    sink.data_reply = None
    assert await worker.run_once() == 1
    [report] = await sink.expect(1)
    assert report.mail_from == "<>" and report.rcpt_tos == [AGENT]
    _, _, blocks = parse_dsn(report.data)
    assert sorted(unfolded(b["Final-Recipient"]) for b in blocks) == [
        "rfc822; a@example.com",
        "rfc822; b@example.org",
    ]
    assert {b["Status"] for b in blocks} == {"5.7.1"}
    assert {unfolded(b["Diagnostic-Code"]) for b in blocks} == {"smtp; 554 5.7.1 rejected"}
    assert [d.status for d in await deliveries(database, bounce.id)] == ["delivered"]
    assert len(await events(database, "delivery.bounced")) == 2
    assert len(await events(database, "bounce.queued")) == 1


async def test_a_bounce_is_never_bounced(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    harness = await start_relay(sink, roles=("smtp",))
    worker = harness.relay.worker
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user"
    sink.refuse[AGENT] = "550 5.1.1 mailbox of the agent is gone"
    message_id = queued_id(await harness.send(make_message(to="gone@example.org")))

    assert await worker.run_once() == 1  # the original bounces, a DSN is queued
    [bounce] = await bounce_messages(database)
    assert await worker.run_once() == 1  # the DSN itself is refused
    assert await worker.run_once() == 0  # and nothing follows it

    [dsn_delivery] = await deliveries(database, bounce.id)
    assert dsn_delivery.recipient == AGENT
    assert dsn_delivery.status == DeliveryStatus.BOUNCED
    assert dsn_delivery.last_error == "550 5.1.1 mailbox of the agent is gone"
    assert [d.status for d in await deliveries(database, message_id)] == ["bounced"]
    assert len(await bounce_messages(database)) == 1
    assert len(await events(database, "bounce.queued")) == 1
    assert len(await events(database, "delivery.bounced")) == 2
    assert sink.messages == []


async def test_a_null_sender_message_is_never_bounced(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    harness = await start_relay(sink, roles=("smtp",))
    raw = make_message(to="gone@example.org").as_bytes(policy=email.policy.SMTP)
    blob = await harness.relay.blobs.put(raw)
    now = utcnow()
    message = MessageRow(
        id=new_id(),
        sender="",
        blob=blob,
        size=len(raw),
        message_id_header="<null@broker.example>",
        received_at=now,
    )
    async with database.transaction() as session:
        session.add(message)
        await session.flush()
        session.add(
            Delivery(
                id=new_id(),
                message_id=message.id,
                recipient="gone@example.org",
                blob=blob,
                next_attempt_at=now,
                expires_at=now + timedelta(days=1),
            )
        )
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user"

    assert await harness.relay.worker.run_once() == 1
    assert [d.status for d in await deliveries(database, message.id)] == ["bounced"]
    assert await bounce_messages(database) == []
    assert await events(database, "bounce.queued") == []
    assert await harness.relay.worker.run_once() == 0


# -- the queue lifetime ----------------------------------------------------------------------


async def test_temporary_failures_retry_with_backoff_until_the_lifetime_then_bounce(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(
        sink,
        clock=clock,
        roles=("smtp",),
        upstream={"queue_lifetime": 60, "retry_base": 2, "retry_max": 8},
    )
    worker = harness.relay.worker
    sink.refuse["slow@example.org"] = "451 4.3.0 try again later"
    message_id = queued_id(await harness.send(make_message(to="slow@example.org")))
    clock.now = utcnow()
    [delivery] = await deliveries(database, message_id)
    expires = delivery.expires_at

    waits: list[float] = []
    for attempt in range(1, 30):
        assert await worker.run_once() == 1
        [delivery] = await deliveries(database, message_id)
        assert delivery.attempts == attempt
        if delivery.status == DeliveryStatus.BOUNCED:
            break
        assert delivery.status == DeliveryStatus.QUEUED
        assert clock.now < expires
        assert delivery.next_attempt_at <= expires
        wait = (delivery.next_attempt_at - clock.now).total_seconds()
        nominal = min(8.0, 2.0 * 2 ** (attempt - 1))
        if delivery.next_attempt_at < expires:
            assert nominal <= wait < nominal * 1.25 + 1e-6, (attempt, wait)
        waits.append(wait)
        # Not due a moment before the next attempt; due at it.
        clock.now = delivery.next_attempt_at - timedelta(milliseconds=1)
        assert await worker.run_once() == 0
        clock.now = delivery.next_attempt_at
    else:
        pytest.fail("the copy never bounced")

    assert clock.now >= expires
    assert waits[0] < waits[1] < waits[2]  # 2, 4, 8 (each stretched by < 1/4)
    assert all(8 <= w < 10 for w in waits[2:-1])  # then capped
    deferred = [e for e in await events(database, "delivery.deferred")]
    assert len(deferred) == len(waits) == delivery.attempts - 1
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("gave up after ")
    assert "451 4.3.0 try again later" in delivery.last_error

    assert await worker.run_once() == 1  # the DSN
    [report] = await sink.expect(1)
    assert report.mail_from == "<>" and report.rcpt_tos == [AGENT]
    _, _, [block] = parse_dsn(report.data)
    assert block["Status"] == "4.4.7"
    assert block["Action"] == "failed"
    assert unfolded(block["Final-Recipient"]) == "rfc822; slow@example.org"
    diagnostic = unfolded(block["Diagnostic-Code"])
    assert diagnostic.startswith("X-Sealrelay; gave up after ")
    assert "451 4.3.0 try again later" in diagnostic


async def test_a_copy_the_running_worker_gives_up_on_reports_4_4_7_everywhere(
    start_relay: StartRelay, sink: Sink, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 3463 X.4.7 "delivery time expired" is the final status of a copy whose lifetime
    ran out, in the DSN, the journal and the log; the last reply stays the diagnostic."""
    caplog.set_level(logging.INFO, logger="gateway.outbound.delivery")
    clock = FakeClock()
    harness = await start_relay(sink, clock=clock, upstream={"queue_lifetime": 60})
    sink.refuse["slow@example.org"] = "451 4.3.0 try again later"
    message_id = queued_id(await harness.send(make_message(to="slow@example.org")))
    [delivery] = await eventually(
        lambda: _when(deliveries(database, message_id), lambda r: r[0].attempts == 1)
    )
    assert delivery.status == DeliveryStatus.QUEUED

    clock.now = delivery.expires_at  # the worker keeps running; the copy is due once more
    harness.relay.signal.notify()
    [report] = await sink.expect(1)

    _, _, [block] = parse_dsn(report.data)
    assert block["Status"] == "4.4.7"
    assert "451 4.3.0 try again later" in unfolded(block["Diagnostic-Code"])
    [bounced] = await events(database, "delivery.bounced")
    assert bounced.data["status"] == "4.4.7"
    assert "451 4.3.0 try again later" in bounced.data["error"]
    [line] = [r.getMessage() for r in caplog.records if "status=bounced" in r.getMessage()]
    assert line.startswith(f"{message_id}: to=<slow@example.org>, ")
    assert ", dsn=4.4.7, status=bounced (gave up after 1 minute; last error: 451 4.3.0 " in line


async def test_a_refused_copy_journals_the_refusals_own_status(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    harness = await start_relay(sink)
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user"
    await harness.send(make_message(to="gone@example.org"))
    [bounced] = await eventually(lambda: events(database, "delivery.bounced"))
    assert bounced.data["status"] == "5.1.1"
    assert bounced.data["error"] == "550 5.1.1 no such user"


# -- restarts and leases ---------------------------------------------------------------------


async def test_a_restarted_relay_delivers_what_the_stopped_one_queued(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    await sink.stop()
    first = await start_relay(sink)
    await first.send(make_message(to="a@example.com, b@example.org"))
    await first.send(make_message(to="c@example.net", subject="Zweites"))
    await eventually(
        lambda: _when(deliveries(database), lambda r: len(r) == 3 and all(d.attempts for d in r))
    )
    await first.relay.stop()
    assert all(d.leased_by is None for d in await deliveries(database))

    await sink.start(sink.port)
    await start_relay(sink, settings=first.settings, roles=("worker",))
    received = await sink.expect(2)
    assert Counter(r for m in received for r in m.rcpt_tos) == Counter(
        ["a@example.com", "b@example.org", "c@example.net"]
    )
    await eventually(
        lambda: _when(deliveries(database), lambda r: all_in({DeliveryStatus.DELIVERED}, r))
    )


async def test_an_expired_lease_is_claimed_by_another_worker(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(sink, clock=clock, roles=("smtp",), worker={"lease_seconds": 30})
    relay = harness.relay
    message_id = queued_id(await harness.send(make_message(to="p@example.com")))
    clock.now = utcnow()

    # A worker claims the copy and dies before it records anything.
    async with database.transaction() as session:
        [dead] = await queue.claim(session, "dead-worker", clock(), timedelta(seconds=30), 10)
    other = DeliveryWorker(
        harness.settings,
        database,
        relay.blobs,
        relay.worker.routes,
        relay.worker.signer,
        relay.signal,
        clock,
    )
    assert await other.run_once() == 0  # the lease still holds
    clock.advance(29)
    assert await other.run_once() == 0
    clock.advance(2)
    assert await other.run_once() == 1
    [copy] = await sink.expect(1)
    assert copy.rcpt_tos == ["p@example.com"]

    [delivery] = await deliveries(database, message_id)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1
    # The dead worker's late outcome is refused: it lost the lease.
    async with database.transaction() as session:
        for mark in (
            queue.mark_delivered(session, dead.delivery, "dead-worker", clock(), None),
            queue.mark_bounced(
                session, dead.delivery, "dead-worker", clock(), "550 x", status="5.0.0"
            ),
        ):
            assert await mark is None
    [delivery] = await deliveries(database, message_id)
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.attempts == 1
    assert len(await events(database, "delivery.delivered", "delivery.bounced")) == 1


async def two_copies_for_one_slot(start_relay: StartRelay, sink: Sink) -> tuple[Harness, FakeClock]:
    """A relay with one delivery slot and a 30 s lease, two copies queued, the clock at now."""
    clock = FakeClock()
    harness = await start_relay(
        sink, clock=clock, roles=("smtp",), worker={"lease_seconds": 30, "concurrency": 1}
    )
    for recipient in ("first@example.com", "second@example.com"):
        await harness.send(make_message(to=recipient))
    clock.now = utcnow()
    return harness, clock


async def test_a_live_worker_sends_no_copy_whose_lease_another_took_over(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    """Two processes, one of them slow: its heartbeat came later than a lease while one
    copy was in flight and another waited for its one slot. The other process took both
    over; the slow one must not send the one that was still waiting. (The one in flight
    had left already: it arrives twice, the most a late heartbeat can cost.)"""
    harness, clock = await two_copies_for_one_slot(start_relay, sink)
    relay = harness.relay
    other = DeliveryWorker(
        harness.settings,
        database,
        relay.blobs,
        relay.worker.routes,
        relay.worker.signer,
        relay.signal,
        clock,
    )

    # run_once has no heartbeat: as if every beat of this process came too late.
    hold = sink.hold = asyncio.Event()
    slow = asyncio.create_task(relay.worker.run_once())
    await sink.wait_held(1, WAIT)
    sink.hold = None
    clock.advance(31)
    assert await other.run_once() == 2
    hold.set()
    async with asyncio.timeout(WAIT):
        assert await slow == 2

    got = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert got == Counter({"first@example.com": 2, "second@example.com": 1})
    rows = await deliveries(database)
    assert all(d.status == DeliveryStatus.DELIVERED and d.attempts == 1 for d in rows)
    assert len(await events(database, "delivery.delivered")) == 2


async def test_only_a_copy_that_waited_a_third_of_a_lease_is_held_again_before_it_leaves(
    start_relay: StartRelay, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that gets its slot at once still has two thirds of the lease its claim set:
    it leaves without a hold (a commit of its own). One that waited longer is held first."""
    harness, clock = await two_copies_for_one_slot(start_relay, sink)
    relay = harness.relay
    holds: list[list[str]] = []
    submit = group_commit.submit

    async def counted(db: Database, unit: Any, *, linger: bool = False) -> Any:
        if isinstance(unit, queue.Hold):
            holds.append(list(unit.ids))
        return await submit(db, unit, linger=linger)

    monkeypatch.setattr(group_commit, "submit", counted)
    hold = sink.hold = asyncio.Event()
    sending = asyncio.create_task(relay.worker.run_once())
    await sink.wait_held(1, WAIT)
    sink.hold = None
    assert holds == []  # the first copy left straight after its claim
    clock.advance(11)  # the second waits for the one slot past a third of the lease
    hold.set()
    async with asyncio.timeout(WAIT):
        assert await sending == 2
    assert len(holds) == 1 and len(holds[0]) == 1
    got = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert got == Counter({"first@example.com": 1, "second@example.com": 1})


async def test_settle_refuses_a_worker_whose_lease_was_taken(database: Database) -> None:
    [delivery_id] = await insert_due(database, 1)
    now = utcnow()
    async with database.transaction() as session:
        [first] = await queue.claim(session, "first", now, timedelta(seconds=1), 10)
    later = now + timedelta(seconds=2)
    async with database.transaction() as session:
        [second] = await queue.claim(session, "second", later, timedelta(seconds=60), 10)
    assert first.delivery.id == second.delivery.id == delivery_id

    async with database.transaction() as session:
        assert (
            await queue.mark_deferred(
                session, first.delivery, "first", later, "421 late", later + timedelta(seconds=5)
            )
            is None
        )
        event = await queue.mark_delivered(session, second.delivery, "second", later, "mx")
    assert event is not None and event.type == "delivery.delivered"
    [row] = await deliveries(database)
    assert row.status == DeliveryStatus.DELIVERED
    assert row.attempts == 1 and row.last_error is None and row.leased_by is None


# -- exclusive claims ------------------------------------------------------------------------


async def insert_due(db: Database, count: int) -> list[str]:
    now = utcnow()
    message = MessageRow(
        id=new_id(),
        sender=AGENT,
        blob="0" * 64,
        size=1,
        message_id_header="<claims@broker.example>",
        received_at=now,
    )
    rows = [
        Delivery(
            id=new_id(),
            message_id=message.id,
            recipient=f"r{i:03d}@example.com",
            blob="0" * 64,
            next_attempt_at=now - timedelta(seconds=1),
            expires_at=now + timedelta(days=1),
        )
        for i in range(count)
    ]
    async with db.transaction() as session:
        session.add(message)
        await session.flush()
        session.add_all(rows)
    return [d.id for d in rows]


async def test_concurrent_claims_never_take_a_delivery_twice(database: Database) -> None:
    ids = await insert_due(database, 50)
    now = utcnow()
    lease = timedelta(seconds=60)

    async def claim(worker: str) -> list[str]:
        async with database.transaction() as session:
            claimed = await queue.claim(session, worker, now, lease, 7)
        assert len(claimed) <= 7
        return [c.delivery.id for c in claimed]

    workers = [f"worker-{i}" for i in range(10)]
    results = await asyncio.gather(*(claim(w) for w in workers))
    taken = [i for result in results for i in result]
    assert len(taken) == len(set(taken)) == 50
    assert set(taken) == set(ids)
    owners = {d.id: d.leased_by for d in await deliveries(database)}
    for worker, result in zip(workers, results, strict=True):
        assert all(owners[i] == worker for i in result)
    # While the leases hold, nobody gets anything.
    assert await claim("late") == []


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # SQLite has one writer
async def test_postgres_claims_skip_rows_locked_by_an_open_claim(database: Database) -> None:
    ids = await insert_due(database, 50)
    now = utcnow()
    lease = timedelta(seconds=60)
    async with database.transaction() as holding:
        first = await queue.claim(holding, "holder", now, lease, 20)
        assert len(first) == 20
        # The holder's transaction is still open: its rows are locked, not yet leased.
        async with asyncio.timeout(5), database.transaction() as session:
            second = await queue.claim(session, "skipper", now, lease, 50)
        assert len(second) == 30
        assert {c.delivery.id for c in first}.isdisjoint(c.delivery.id for c in second)
        assert {c.delivery.id for c in first} | {c.delivery.id for c in second} == set(ids)
    async with database.transaction() as session:
        assert await queue.claim(session, "third", now, lease, 50) == []


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # SQLite has one writer
async def test_postgres_renewal_is_not_held_up_by_a_locked_copy(database: Database) -> None:
    """The heartbeat renews every lease it can now, not after whatever transaction holds one
    of its copies (its outcome being recorded) ends: meanwhile the others would run out."""
    ids = await insert_due(database, 3)
    now = utcnow()
    lease = timedelta(seconds=30)
    async with database.transaction() as session:
        assert len(await queue.claim(session, "worker", now, lease, 3)) == 3
    later = now + timedelta(seconds=20)
    async with database.transaction() as recording:
        await recording.execute(
            update(Delivery).where(Delivery.id == ids[0]).values(last_error="recording")
        )
        async with asyncio.timeout(5), database.transaction() as session:
            assert await queue.renew(session, ids, "worker", later, lease) == 2
    leases = {d.id: d.lease_until for d in await deliveries(database)}
    assert leases == {ids[0]: now + lease, ids[1]: later + lease, ids[2]: later + lease}


async def test_two_workers_deliver_each_copy_once(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    harness = await start_relay(sink, roles=("smtp",), worker={"batch_size": 7})
    relay = harness.relay
    agent = await users.authenticate(database, AGENT, PASSWORD)
    assert agent is not None
    expected = []
    for m in range(10):
        recipients = tuple(f"r{m}-{i}@example.com" for i in range(5))
        expected += recipients
        raw = make_message(to=", ".join(recipients), subject=f"Nr. {m}").as_bytes(
            policy=email.policy.SMTP
        )
        await relay.pipeline.submit(
            PipelineEnvelope(AGENT, recipients), raw, agent, Origin("pc", "127.0.0.1", "ESMTPSA")
        )
    other = DeliveryWorker(
        harness.settings,
        database,
        relay.blobs,
        relay.worker.routes,
        relay.worker.signer,
        relay.signal,
    )
    handled = 0
    async with asyncio.timeout(WAIT):
        while handled < 50:
            counts = await asyncio.gather(relay.worker.run_once(), other.run_once())
            assert all(c <= 7 for c in counts)
            handled += sum(counts)
    assert handled == 50
    assert await relay.worker.run_once() == 0 and await other.run_once() == 0

    got = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert got == Counter(expected)
    rows = await deliveries(database)
    assert len(rows) == 50
    assert all(d.status == DeliveryStatus.DELIVERED and d.attempts == 1 for d in rows)
    assert len(await events(database, "delivery.delivered")) == 50


def counting_claims(worker: DeliveryWorker) -> list[int]:
    """The limit of each claim `worker` makes from now on (its own claims run unchanged)."""
    limits: list[int] = []
    claim = worker._claim

    async def counted(limit: int) -> list[queue.Claimed]:
        limits.append(limit)
        return await claim(limit)

    worker._claim = counted  # type: ignore[method-assign]
    return limits


async def test_a_claim_short_of_room_goes_on_when_a_group_has_gone(
    start_relay: StartRelay, sink: Sink, database: Database
) -> None:
    """With room for one copy, each claim fills it; the next waits for the group to end,
    not for the poll."""
    harness = await start_relay(sink, roles=("smtp",), worker={"poll_seconds": 60, "batch_size": 1})
    agent = await users.authenticate(database, AGENT, PASSWORD)
    assert agent is not None
    for number in range(3):
        raw = make_message(to=f"r{number}@example.com").as_bytes(policy=email.policy.SMTP)
        await harness.relay.pipeline.submit(
            PipelineEnvelope(AGENT, (f"r{number}@example.com",)),
            raw,
            agent,
            Origin("pc", "127.0.0.1", "ESMTPSA"),
        )
    worker = DeliveryWorker(
        harness.settings,
        database,
        harness.relay.blobs,
        harness.relay.worker.routes,
        harness.relay.worker.signer,
        harness.relay.signal,
    )
    claims = counting_claims(worker)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        received = await sink.expect(3, timeout=WAIT)  # far inside the 60 s poll
    finally:
        stop.set()
        harness.relay.signal.notify()
        await running
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        "r0@example.com",
        "r1@example.com",
        "r2@example.com",
    ]
    assert claims[:3] == [1, 1, 1], claims


# -- transports ------------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_capture_writes_each_copy_with_its_envelope(
    start_relay: StartRelay, tmp_path: Path, database: Database
) -> None:
    outbox = tmp_path / "outbox"
    idle = Sink(port=free_port())  # never started: the capture upstream does not use it
    harness = await start_relay(idle, upstream={"url": f"capture:{outbox}"})
    await harness.send(make_message(to="a@example.com, b@example.org"))
    await harness.send(make_message(to="c@example.net", subject="Zweites"))
    await eventually(
        lambda: _when(
            deliveries(database), lambda r: len(r) == 3 and all_in({DeliveryStatus.DELIVERED}, r)
        )
    )

    emls = sorted(outbox.glob("*.eml"))
    assert len(emls) == 2
    assert sorted(p.name for p in outbox.iterdir()) == sorted(
        [p.name for p in emls] + [p.with_suffix(".json").name for p in emls]
    )
    envelopes = []
    for eml in emls:
        envelope = json.loads(eml.with_suffix(".json").read_text())
        assert envelope["mail_from"] == AGENT
        envelopes.append(sorted(envelope["rcpt_tos"]))
        data = eml.read_bytes()
        assert data.startswith(b"DKIM-Signature:")
        assert dkimpy.verify(data, dnsfunc=dkim_dns(harness.dkim_key))
    assert sorted(envelopes) == [["a@example.com", "b@example.org"], ["c@example.net"]]
    remotes = [e.data["remote"] for e in await events(database, "delivery.delivered")]
    assert remotes == [None, None, None]


@dataclass
class SecureSink(Sink):
    """A smart host that insists on TLS (STARTTLS, or implicit) and AUTH."""

    tls: ssl.SSLContext | None = None
    implicit_tls: bool = False
    accounts: dict[str, str] = field(default_factory=dict)
    logins: list[str | None] = field(default_factory=list)
    encrypted: list[bool] = field(default_factory=list)
    failed_logins: int = 0

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = data.login.decode()
        if self.accounts.get(login) == data.password.decode():
            return AuthResult(success=True, auth_data=login)
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)  # aiosmtpd replies 535

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        self.logins.append(session.auth_data)
        self.encrypted.append(server.transport.get_extra_info("ssl_object") is not None)
        return await super().handle_DATA(server, session, envelope)

    async def start(self, port: int | None = None) -> SecureSink:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        self.port = port or self.port or free_port()

        def make() -> SMTP:
            return SMTP(
                self,
                hostname="smarthost.test",
                decode_data=False,
                data_size_limit=None,
                tls_context=None if self.implicit_tls else self.tls,
                require_starttls=not self.implicit_tls,
                auth_required=True,
                auth_require_tls=not self.implicit_tls,
                authenticator=self.authenticate,
            )

        ssl_context = self.tls if self.implicit_tls else None
        self._server = await loop.create_server(make, "127.0.0.1", self.port, ssl=ssl_context)
        return self


@pytest.fixture
async def secure_sink(
    request: pytest.FixtureRequest, tls_files: tuple[Path, Path]
) -> AsyncIterator[SecureSink]:
    implicit = getattr(request, "param", "starttls") == "implicit"
    server = SecureSink(tls=server_tls(*tls_files), implicit_tls=implicit)
    server.accounts["relay@broker.example"] = "upstream secret 1"
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
@pytest.mark.parametrize("secure_sink", ["starttls", "implicit"], indirect=True)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # TLS is implicit
async def test_smtp_upstream_with_tls_and_auth(
    start_relay: StartRelay, secure_sink: SecureSink, database: Database
) -> None:
    scheme = "smtps" if secure_sink.implicit_tls else "smtp"
    harness = await start_relay(
        secure_sink,
        upstream={
            "url": f"{scheme}://127.0.0.1:{secure_sink.port}",
            "username": "relay@broker.example",
            "password": "upstream secret 1",
        },
    )
    await harness.send(make_message(to="p@example.com"))
    [copy] = await secure_sink.expect(1)
    assert copy.rcpt_tos == ["p@example.com"]
    assert secure_sink.logins == ["relay@broker.example"]
    assert secure_sink.encrypted == [True]
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(harness.dkim_key))
    await eventually(
        lambda: _when(deliveries(database), lambda r: all_in({DeliveryStatus.DELIVERED}, r))
    )


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_the_upstream_password_can_come_from_a_file(
    start_relay: StartRelay, secure_sink: SecureSink, database: Database, tmp_path: Path
) -> None:
    """A systemd credential or a container secret: the file's line, without its line end."""
    secret = tmp_path / "upstream-password"
    secret.write_text("upstream secret 1\n")
    harness = await start_relay(
        secure_sink,
        upstream={
            "url": f"smtp://127.0.0.1:{secure_sink.port}",
            "username": "relay@broker.example",
            "password_file": str(secret),
        },
    )
    await harness.send(make_message(to="p@example.com"))
    [copy] = await secure_sink.expect(1)
    assert copy.rcpt_tos == ["p@example.com"]
    assert secure_sink.logins == ["relay@broker.example"] and secure_sink.failed_logins == 0


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_wrong_upstream_credentials_defer_instead_of_bouncing(
    start_relay: StartRelay, secure_sink: SecureSink, database: Database
) -> None:
    harness = await start_relay(
        secure_sink,
        upstream={"username": "relay@broker.example", "password": "a new secret 2"},
    )
    message_id = queued_id(await harness.send(make_message(to="p@example.com")))
    delivery = await eventually(
        lambda: _when(delivery_to(database, "p@example.com"), lambda d: d.attempts >= 2)
    )
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.last_error is not None and "535" in delivery.last_error
    assert secure_sink.failed_logins >= 2
    assert secure_sink.messages == []
    assert await bounce_messages(database) == []

    # The smart host's admin rotates the password to the one the relay already has.
    secure_sink.accounts["relay@broker.example"] = "a new secret 2"
    [copy] = await secure_sink.expect(1)
    assert copy.rcpt_tos == ["p@example.com"]
    await eventually(
        lambda: _when(
            deliveries(database, message_id), lambda r: all_in({DeliveryStatus.DELIVERED}, r)
        )
    )
    assert await bounce_messages(database) == []


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_missing_upstream_credentials_do_not_lose_mail(
    start_relay: StartRelay, secure_sink: SecureSink, database: Database
) -> None:
    """A smart host that wants AUTH from a relay configured without it: retry, not bounce."""
    harness = await start_relay(secure_sink)
    await harness.send(make_message(to="p@example.com"))
    delivery = await eventually(
        lambda: _when(delivery_to(database, "p@example.com"), lambda d: d.attempts >= 1)
    )
    assert delivery.status == DeliveryStatus.QUEUED, delivery.last_error
    assert await bounce_messages(database) == []
