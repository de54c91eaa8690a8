"""Webhooks end to end: real mail through the relay, a real aiohttp receiver, the
`standardwebhooks` package as the judge of signatures. SQLite and PostgreSQL.

Tests that need time to pass give the relay a clock moved by hand and drive the webhook
worker round by round (`run_once`), as the mail worker's tests do; no test sleeps.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.events import CATALOG
from gateway.store.models import (
    Event,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
)
from gateway.store.sequencer import chain_all
from gateway.webhooks.desk import WebhookError
from gateway.webhooks.tunables import SCHEDULE
from gateway.webhooks.worker import WebhookWorker
from tests.conftest import Harness, make_message
from tests.support import Sink
from tests.webhooks.conftest import FakeClock, StartRelay
from tests.webhooks.receiver import Answer, Post, Receiver

MAIL_EVENTS = ["message.received", "delivery.queued", "delivery.delivered"]


async def journal(db: Database, *types: str) -> list[Event]:
    async with db.transaction() as session:
        query = select(Event).order_by(Event.seq)
        if types:
            query = query.where(Event.type.in_(types))
        return list(await session.scalars(query))


async def deliveries(db: Database) -> list[WebhookDelivery]:
    async with db.transaction() as session:
        rows = await session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.event_seq))
        return list(rows)


async def endpoint_row(db: Database, endpoint_id: str) -> WebhookEndpoint:
    async with db.transaction() as session:
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        return endpoint


def in_order_per_message(posts: list[Post]) -> None:
    by_message: dict[str, list[int]] = defaultdict(list)
    for post in posts:
        message = post.json["data"]["message_id"]
        if message is not None:
            by_message[message].append(post.seq)
    for message, seqs in by_message.items():
        assert seqs == sorted(seqs), (message, seqs)


async def recorded(harness: Harness, timeout: float = 20) -> None:
    """Until no webhook delivery is queued: every outcome is recorded (bounded)."""
    async with asyncio.timeout(timeout):
        while await harness.relay.webhooks.pending():
            await asyncio.sleep(0.02)


# -- arriving ----------------------------------------------------------------------------------


async def test_events_of_real_mail_arrive_signed_in_order(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    harness = await start_relay(worker={"poll_seconds": 0.05})
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=MAIL_EVENTS, allow_private=True
    )
    await harness.send(make_message(to="paula@example.com"))
    await harness.send(make_message(to="omar@example.org"))
    posts = await receiver.expect(6)

    expected = await journal(database, *MAIL_EVENTS)
    assert sorted(p.seq for p in posts) == [e.seq for e in expected]
    for post, event in zip(sorted(posts, key=lambda p: p.seq), expected, strict=True):
        document = post.verify(created.secret)  # raises unless the signature holds
        assert post.id == f"evt_{event.seq}"
        assert document["type"] == event.type
        assert document["timestamp"].endswith("Z")
        assert document["data"] == {
            "seq": event.seq,
            "message_id": event.message_id,
            "delivery_id": event.delivery_id,
            "payload": event.data,
        }
        assert len(post.signatures) == 1 and post.signatures[0].startswith("v1,")
    in_order_per_message(posts)
    await recorded(harness)  # the receiver has them; the worker records right after
    rows = await deliveries(database)
    assert {d.status for d in rows} == {WebhookDeliveryStatus.DELIVERED}
    assert {d.last_status_code for d in rows} == {200}
    assert all(d.attempts == 1 for d in rows)


async def test_a_receiver_down_for_a_while_gets_every_event_in_order_once_up(
    start_relay: StartRelay, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    receiver = Receiver()  # not started yet: connections are refused
    relay = harness.relay
    created = await relay.webhooks.create(receiver.url, allow_private=True)
    for n in range(3):
        await harness.send(make_message(to=f"p{n}@example.com"))
    assert await relay.worker.run_once() == 3
    await harness.sink.expect(3)

    # Down: each message's first event is tried and deferred; the later ones of the same
    # message wait behind it.
    await chain_all(relay.db)
    first_round = await relay.webhook_worker.run_once()
    assert first_round == 4  # the endpoint's own creation event and one per message
    waiting = [d for d in await deliveries(database) if d.attempts]
    assert {d.status for d in waiting} == {WebhookDeliveryStatus.QUEUED}
    for d in waiting:
        assert d.last_status_code is None and d.last_error
        wait = (d.next_attempt_at - clock.now).total_seconds()
        assert SCHEDULE[0] <= wait <= SCHEDULE[0] * 1.25
    clock.advance(SCHEDULE[0] * 1.25)
    await chain_all(relay.db)
    assert await relay.webhook_worker.run_once() == 4  # still down: the second attempt
    await chain_all(relay.db)
    assert await relay.webhook_worker.run_once() == 0  # nothing is due before its time

    await receiver.start()
    try:
        clock.advance(SCHEDULE[1] * 1.25)
        await chain_all(relay.db)
        await relay.webhook_worker.run_once()
        expected = await journal(database)
        expected = [e for e in expected if e.seq >= min(d.event_seq for d in waiting)]
        posts = receiver.posts
        assert sorted(p.id for p in posts) == sorted(f"evt_{e.seq}" for e in expected)
        assert len({p.id for p in posts}) == len(posts)  # none twice
        in_order_per_message(posts)
        assert all(p.signed_by(created.secret) for p in posts)
        rows = await deliveries(database)
        assert {d.status for d in rows} == {WebhookDeliveryStatus.DELIVERED}
        assert (await endpoint_row(database, created.endpoint.id)).failing_since is None
    finally:
        await receiver.stop()


async def test_a_receiver_that_hangs_never_delays_mail(
    start_relay: StartRelay, receiver: Receiver, sink: Sink
) -> None:
    receiver.gate = asyncio.Event()
    harness = await start_relay(worker={"poll_seconds": 0.05})
    await harness.relay.webhooks.create(receiver.url, allow_private=True)
    await harness.send(make_message(to="first@example.com"))
    await receiver.until_waiting(1)  # a post is hanging now
    for n in range(5):
        await harness.send(make_message(to=f"p{n}@example.com"))
    await sink.expect(6, timeout=10)  # all mail left while the receiver hangs
    assert receiver.waiting >= 1 and receiver.posts == []
    receiver.gate.set()
    await receiver.expect(1)


# -- answers ---------------------------------------------------------------------------------


async def test_410_gone_disables_the_endpoint_and_gives_up_its_queue(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    created = await harness.relay.webhooks.create(receiver.url, allow_private=True)
    receiver.default = Answer(410)
    await harness.send(make_message())
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() >= 1
    endpoint = await endpoint_row(database, created.endpoint.id)
    assert not endpoint.enabled
    assert endpoint.disabled_reason == "the receiver answered 410 Gone"
    rows = await deliveries(database)
    assert rows and {d.status for d in rows} == {WebhookDeliveryStatus.FAILED}
    # Posts already under way when the first 410 came are given up with the rest.
    assert 410 in {d.last_status_code for d in rows} and receiver.posts == []
    [disabled] = await journal(database, "webhook.endpoint_disabled")
    assert disabled.data == {
        "endpoint_id": endpoint.id,
        "reason": "the receiver answered 410 Gone",
        "by": "relay",
    }
    # Later events are not fanned out to it.
    before = len(rows)
    await harness.send(make_message())
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() == 0
    assert len(await deliveries(database)) == before


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    start_relay: StartRelay, receiver: Receiver, database: Database, status: int
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=["webhook.test"], allow_private=True
    )
    receiver.answers = [Answer(status, {"Retry-After": "120"})]
    seq = await harness.relay.webhooks.send_test(created.endpoint.id)
    worker = harness.relay.webhook_worker
    await chain_all(worker.db)
    assert await worker.run_once() == 1
    [delivery] = await deliveries(database)
    assert delivery.status == WebhookDeliveryStatus.QUEUED
    assert delivery.last_status_code == status
    assert delivery.next_attempt_at == clock.now + timedelta(seconds=120)
    clock.advance(119)
    await chain_all(worker.db)
    assert await worker.run_once() == 0
    clock.advance(1)
    await chain_all(worker.db)
    assert await worker.run_once() == 1
    [post] = receiver.posts
    assert post.id == f"evt_{seq}" and post.type == "webhook.test"
    post.verify(created.secret)


async def test_failing_for_three_days_disables_and_mails_the_admins(
    start_relay: StartRelay, receiver: Receiver, database: Database, sink: Sink
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=["webhook.test"], allow_private=True, description="CRM"
    )
    receiver.default = Answer(500)
    await harness.relay.webhooks.send_test(created.endpoint.id)
    worker = harness.relay.webhook_worker
    started = clock.now
    for _ in range(len(SCHEDULE) + 1):
        await chain_all(worker.db)
        assert await worker.run_once() == 1
        endpoint = await endpoint_row(database, created.endpoint.id)
        if not endpoint.enabled:
            break
        [delivery] = await deliveries(database)
        clock.now = delivery.next_attempt_at
    else:
        pytest.fail("the endpoint was never disabled")
    assert clock.now - started >= timedelta(days=3)
    assert endpoint.disabled_reason == "no event was accepted for 3 days"
    assert endpoint.failing_since == started
    [delivery] = await deliveries(database)
    assert delivery.status == WebhookDeliveryStatus.FAILED

    assert await harness.relay.worker.run_once() == 1
    [notice] = await sink.expect(1)
    assert notice.rcpt_tos == ["it@broker.example"]
    text = notice.data.decode()
    assert "Subject: Webhook abgeschaltet: http://127.0.0.1:" in text
    assert "sealrelay webhook enable " + endpoint.id in text.replace("=\r\n", "")


async def test_every_attempt_failing_ends_after_the_schedule(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=["webhook.test"], allow_private=True
    )
    receiver.default = Answer(500)
    await harness.relay.webhooks.send_test(created.endpoint.id)
    worker = harness.relay.webhook_worker
    waits = []
    for _ in range(len(SCHEDULE) + 1):
        await chain_all(worker.db)
        assert await worker.run_once() == 1
        [delivery] = await deliveries(database)
        if delivery.status != WebhookDeliveryStatus.QUEUED:
            break
        waits.append((delivery.next_attempt_at - clock.now).total_seconds())
        clock.now = delivery.next_attempt_at
        # Re-enable so the three-day rule does not end it first: this is about the schedule.
        async with database.transaction() as session:
            row = await session.get(WebhookEndpoint, created.endpoint.id)
            assert row is not None
            row.failing_since = None
    assert delivery.status == WebhookDeliveryStatus.FAILED
    assert delivery.attempts == len(SCHEDULE) + 1
    assert len(waits) == len(SCHEDULE)
    for wait, nominal in zip(waits, SCHEDULE, strict=True):
        assert nominal <= wait <= nominal * 1.25
    assert sum(waits) >= 3 * 86400


async def test_redirects_are_not_followed(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    moved = receiver.url.replace("/hooks", "/moved")
    created = await harness.relay.webhooks.create(
        moved, event_types=["webhook.test"], allow_private=True
    )
    await harness.relay.webhooks.send_test(created.endpoint.id)
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() == 1
    [delivery] = await deliveries(database)
    assert delivery.status == WebhookDeliveryStatus.QUEUED
    assert delivery.last_status_code == 307
    assert receiver.posts == []


# -- replay, thin payloads, rotation ---------------------------------------------------------


async def test_replay_posts_again_with_the_same_webhook_id(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    desk = harness.relay.webhooks
    created = await desk.create(receiver.url, event_types=["message.received"], allow_private=True)
    await harness.send(make_message())
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() == 1
    [first] = receiver.posts
    [event] = await journal(database, "message.received")

    assert await desk.replay(created.endpoint.id, seq=event.seq) == 1
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() == 1
    assert receiver.posts[1].id == first.id == f"evt_{event.seq}"
    assert receiver.posts[1].body == first.body

    # A range: the events it receives, from their own times.
    clock.advance(60)
    await harness.send(make_message())
    await chain_all(harness.relay.db)
    count = await desk.replay(
        created.endpoint.id, since=event.at, until=clock.now + timedelta(seconds=1)
    )
    assert count == 2
    await chain_all(harness.relay.db)
    await harness.relay.webhook_worker.run_once()
    ids = [p.id for p in receiver.posts]
    received = [f"evt_{e.seq}" for e in await journal(database, "message.received")]
    assert sorted(ids) == sorted([received[0], received[0], received[0], received[1], received[1]])

    [queued, *_] = await journal(database, "delivery.queued")
    with pytest.raises(WebhookError, match=r"does not receive delivery\.queued"):
        await desk.replay(created.endpoint.id, seq=queued.seq)
    with pytest.raises(WebhookError, match="no event 999999"):
        await desk.replay(created.endpoint.id, seq=999999)
    with pytest.raises(WebhookError, match="one event"):
        await desk.replay(created.endpoint.id)
    with pytest.raises(WebhookError, match="since must be before until"):
        await desk.replay(created.endpoint.id, since=clock.now, until=clock.now)


async def test_thin_endpoints_get_no_personal_fields(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    harness = await start_relay(worker={"poll_seconds": 0.05})
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=MAIL_EVENTS, allow_private=True, thin=True
    )
    await harness.send(make_message(to="paula@example.com", subject="Exposé Lindenweg 4"))
    posts = await receiver.expect(3)
    for post in posts:
        document = post.verify(created.secret)
        payload = document["data"]["payload"]
        personal = {f.name for f in CATALOG[post.type].fields() if f.personal}
        assert personal and not personal & set(payload), (post.type, payload)
        assert b"paula@example.com" not in post.body and "Lindenweg" not in post.body.decode()
    by_type = {p.type: p.json["data"]["payload"] for p in posts}
    assert by_type["delivery.delivered"]["attempt"] == 1
    assert set(by_type["message.received"]) == {"size", "message_id", "user_id"}


async def test_during_a_rotation_both_secrets_sign(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    desk = harness.relay.webhooks
    created = await desk.create(receiver.url, event_types=["webhook.test"], allow_private=True)
    new = await desk.rotate_secret(created.endpoint.id)
    assert new.startswith("whsec_") and new != created.secret
    await desk.send_test(created.endpoint.id)
    await chain_all(harness.relay.db)
    await harness.relay.webhook_worker.run_once()
    [post] = receiver.posts
    assert len(post.signatures) == 2
    post.verify(created.secret)
    post.verify(new)

    clock.advance(24 * 3600 + 1)  # the grace is over: only the new secret signs
    await desk.send_test(created.endpoint.id)
    await chain_all(harness.relay.db)
    await harness.relay.webhook_worker.run_once()
    later = receiver.posts[1]
    assert len(later.signatures) == 1
    assert later.signed_by(new) and not later.signed_by(created.secret)
    [changed] = await journal(database, "webhook.endpoint_changed")
    assert changed.data["changed"] == ["secret"]
    assert created.secret not in str(changed.data) and new not in str(changed.data)


async def test_each_delivery_checks_the_address_again(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    """The host resolved to an allowed address when the endpoint was made; now it is not
    allowed (as when DNS starts answering with a loopback address): nothing is posted."""
    clock = FakeClock()
    harness = await start_relay(clock=clock, roles=("smtp",))
    created = await harness.relay.webhooks.create(
        receiver.url.replace("127.0.0.1", "localhost"),
        event_types=["webhook.test"],
        allow_private=True,
    )
    async with database.transaction() as session:
        row = await session.get(WebhookEndpoint, created.endpoint.id)
        assert row is not None
        row.allow_private = False
    await harness.relay.webhooks.send_test(created.endpoint.id)
    await chain_all(harness.relay.db)
    assert await harness.relay.webhook_worker.run_once() == 1
    [delivery] = await deliveries(database)
    assert delivery.status == WebhookDeliveryStatus.QUEUED
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("refused: localhost leads to an address")
    assert "is loopback" in delivery.last_error
    assert receiver.posts == [] and receiver.refused == []


async def test_a_stop_abandons_a_hanging_post_and_hands_its_delivery_back(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    receiver.gate = asyncio.Event()
    harness = await start_relay(roles=("smtp",), worker={"poll_seconds": 0.05})
    created = await harness.relay.webhooks.create(
        receiver.url, event_types=["webhook.test"], allow_private=True
    )
    await harness.relay.webhooks.send_test(created.endpoint.id)
    stop = asyncio.Event()
    worker = asyncio.create_task(harness.relay.webhook_worker.run(stop))
    await receiver.until_waiting(1)
    [held] = await deliveries(database)
    assert held.leased_by == harness.relay.webhook_worker.name
    stop.set()
    async with asyncio.timeout(5):  # not the 15 s a hanging receiver could take
        await worker
    [released] = await deliveries(database)
    assert released.status == WebhookDeliveryStatus.QUEUED
    assert released.leased_by is None and released.lease_until is None
    assert released.attempts == 0  # nothing was answered: no attempt counted


async def test_a_hanging_receiver_never_holds_every_slot(
    start_relay: StartRelay, receiver: Receiver, database: Database
) -> None:
    receiver.gate = asyncio.Event()
    other = await Receiver().start()
    try:
        harness = await start_relay(roles=("smtp",), worker={"poll_seconds": 0.05})
        desk = harness.relay.webhooks
        hanging = await desk.create(receiver.url, event_types=["webhook.test"], allow_private=True)
        answering = await desk.create(other.url, event_types=["webhook.test"], allow_private=True)
        for _ in range(6):
            await desk.send_test(hanging.endpoint.id)
        await desk.send_test(answering.endpoint.id)
        worker = WebhookWorker(
            harness.settings, database, harness.relay.blobs, lambda: None, concurrency=4
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            [post] = await other.expect(1)  # while three posts hang on the first receiver
            assert receiver.waiting == 3 and receiver.posts == []
            post.verify(answering.secret)
        finally:
            stop.set()
            await running
    finally:
        await other.stop()
