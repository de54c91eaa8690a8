"""Sends per destination and in all (`[worker] destination_concurrency`, `concurrency`):
a destination that is slow holds at most its own share, never the other destinations' mail.

Every relay here runs on SQLite and on PostgreSQL against real SMTP sinks on loopback, one per
destination, that count the transactions they hold in DATA at once. A sink holds each
conversation in DATA until the test releases it (an asyncio.Event): no sleeps.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.outbound.delivery import WAITING_BATCHES
from gateway.outbound.destination_gates import DestinationGates
from gateway.store.models import DeliveryStatus
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, make_message
from tests.outbound.test_delivery import WAIT, deliveries, eventually
from tests.support import Sink


@dataclass
class Tally:
    """Transactions in DATA at once, now and at most: per sink, or shared by several."""

    now: int = 0
    most: int = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


@dataclass
class CountingSink(Sink):
    own: Tally = field(default_factory=Tally)
    total: Tally = field(default_factory=Tally)  # shared with the test's other sinks

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.own.enter()
        self.total.enter()
        try:
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.own.leave()
            self.total.leave()


@pytest.fixture
async def sink() -> AsyncIterator[CountingSink]:
    """The default upstream's sink (relay_factory's), the slow destination."""
    server = await CountingSink().start()
    yield server
    await server.stop()


@pytest.fixture
async def others(sink: CountingSink) -> AsyncIterator[list[CountingSink]]:
    """Two more destinations, counted in one total with the default one."""
    made = [await CountingSink(total=sink.total).start() for _ in range(2)]
    yield made
    for server in made:
        await server.stop()


def routed(*sinks: CountingSink) -> dict[str, Any]:
    """Settings sending mail for dN.example to the Nth sink, through an upstream of its own."""
    upstreams = {
        f"d{n}": {"url": f"smtp://127.0.0.1:{s.port}", "verify_tls": False, "timeout": 10}
        for n, s in enumerate(sinks, 1)
    }
    routes = [
        {"name": f"to-d{n}", "upstream": f"d{n}", "recipient_domains": [f"d{n}.example"]}
        for n in range(1, len(sinks) + 1)
    ]
    return {"upstreams": upstreams, "routes": routes}


async def send_each(harness: Harness, recipients: list[str]) -> None:
    """One message per recipient, each leaving as a group of its own; one session."""
    async with harness.client(username=AGENT, password=PASSWORD) as client:
        for recipient in recipients:
            await client.send_message(make_message(to=recipient), sender=AGENT)


async def all_delivered_once(harness: Harness, sinks: list[CountingSink], count: int) -> None:
    """Every copy delivered, each recipient exactly once across the sinks, and recorded."""

    async def done() -> bool:
        rows = await deliveries(harness.relay.db)
        return len(rows) == count and all(d.status == DeliveryStatus.DELIVERED for d in rows)

    await eventually(done)
    got = Counter(r for s in sinks for m in s.messages for r in m.rcpt_tos)
    assert len(got) == count and set(got.values()) == {1}, got


def key_of(harness: Harness) -> Hashable:
    """The default upstream's destination, as the worker's gates know it."""
    return harness.relay.worker.routes.default.upstream.destination("x@example.com").key


async def until(check: Callable[[], bool]) -> None:
    async def checked() -> bool:
        return check()

    await eventually(checked)


async def test_a_slow_destination_holds_its_share_while_another_gets_its_mail(
    relay_factory: StartRelay, sink: CountingSink, others: list[CountingSink]
) -> None:
    """The default sink holds every conversation; with a batch of 2 and one send per
    destination, the old single limit left the claims stuck behind the slow one's copies."""
    fast = others[0]
    harness = await relay_factory(
        worker={"concurrency": 4, "destination_concurrency": 1, "batch_size": 2},
        **routed(fast),
    )
    release = sink.hold = asyncio.Event()
    slow_to = [f"slow{n}@example.com" for n in range(5)]
    await send_each(harness, slow_to)
    await sink.wait_held(1, WAIT)

    fast_to = [f"fast{n}@d1.example" for n in range(3)]
    await send_each(harness, fast_to)
    await fast.expect(3, WAIT)
    assert sink.own.now == 1 and sink.messages == []
    gates, key = harness.relay.worker.destinations, key_of(harness)
    await until(lambda: gates.waiting(key) == 4)
    assert gates.running(key) == 1

    release.set()
    await all_delivered_once(harness, [sink, fast], 8)
    assert sink.own.most == 1 and fast.own.most <= 1
    rows = await deliveries(harness.relay.db)
    assert all(d.attempts == 1 for d in rows)


async def test_the_destination_and_the_total_limits_are_never_exceeded(
    relay_factory: StartRelay, sink: CountingSink, others: list[CountingSink]
) -> None:
    """Three destinations, 2 sends each at most, 5 in all: all held, the fifth
    conversation is the last to begin until one ends."""
    harness = await relay_factory(
        worker={"concurrency": 5, "destination_concurrency": 2}, **routed(*others)
    )
    sinks = [sink, *others]
    for held in sinks:
        held.hold = asyncio.Event()
    recipients = [f"p{n}@{domain}" for n in range(4) for domain in ("example.com", *DOMAINS)]
    await send_each(harness, recipients)

    await until(lambda: sink.total.now == 5)
    assert [s.own.now for s in sinks].count(2) == 2 and sum(s.own.now for s in sinks) == 5
    for held in sinks:
        assert held.hold is not None
        held.hold.set()
    await all_delivered_once(harness, sinks, 12)
    assert sink.total.most == 5
    assert max(s.own.most for s in sinks) == 2


DOMAINS = ("d1.example", "d2.example")


async def test_claims_pause_once_the_copies_waiting_for_destinations_reach_their_bound(
    relay_factory: StartRelay, sink: CountingSink
) -> None:
    """Copies waiting for a busy destination are held in memory and leased: at most
    WAITING_BATCHES batches of them, then the rest stays in the queue, unleased."""
    harness = await relay_factory(
        worker={"concurrency": 4, "destination_concurrency": 1, "batch_size": 2}
    )
    bound = 2 * WAITING_BATCHES
    release = sink.hold = asyncio.Event()
    await send_each(harness, [f"p{n}@example.com" for n in range(bound + 3)])
    gates, key = harness.relay.worker.destinations, key_of(harness)
    await until(lambda: gates.waiting(key) == bound)
    rows = await deliveries(harness.relay.db)
    assert sum(d.leased_by is not None for d in rows) == bound + 1
    assert sum(d.leased_by is None for d in rows) == 2
    assert gates.running(key) == 1 and sink.own.now == 1

    release.set()
    await all_delivered_once(harness, [sink], bound + 3)
    assert sink.own.most == 1


async def test_a_destination_that_defers_a_whole_send_gets_one_at_a_time_until_one_succeeds(
    relay_factory: StartRelay, sink: CountingSink
) -> None:
    harness = await relay_factory(worker={"concurrency": 6, "destination_concurrency": 3})
    gates, key = harness.relay.worker.destinations, key_of(harness)
    first = sink.hold = asyncio.Event()
    await send_each(harness, [f"p{n}@example.com" for n in range(6)])
    await sink.wait_held(3, WAIT)
    await until(lambda: gates.waiting(key) == 3)
    assert gates.running(key) == 3

    # The three held are refused for now: the destination is in trouble.
    sink.data_reply = "451 4.7.500 server busy, try again later"
    probe = sink.hold = asyncio.Event()
    first.set()
    await sink.wait_held(4, WAIT)
    # (the three deferred may be back, waiting too: the retries here are fast)
    assert gates.throttled(key) and gates.running(key) == 1 and gates.waiting(key) >= 2
    assert sink.own.now == 1

    # The probe succeeds: the full limit again, those waiting go together.
    sink.data_reply = None
    rest = sink.hold = asyncio.Event()
    probe.set()
    await sink.wait_held(6, WAIT)
    assert not gates.throttled(key)

    await until(lambda: sink.own.now >= 2)
    rest.set()
    await all_delivered_once(harness, [sink], 6)
    assert sink.own.most == 3
    rows = await deliveries(harness.relay.db)
    assert sorted(d.attempts for d in rows) == [1, 1, 1, 2, 2, 2]


# -- the gates alone -------------------------------------------------------------------------


async def test_gates_admit_in_order_and_a_cancelled_waiter_gives_up_its_turn() -> None:
    gates = DestinationGates(2)
    entered: list[int] = []
    leave = {n: asyncio.Event() for n in range(5)}

    async def send(n: int, key: str = "a") -> None:
        async with gates.slot(key):
            entered.append(n)
            await leave[n].wait()

    tasks = {n: asyncio.create_task(send(n)) for n in range(4)}
    other = asyncio.create_task(send(4, "b"))  # another destination: not behind "a"
    async with asyncio.timeout(WAIT):
        while len(entered) < 3:
            await asyncio.sleep(0)
    assert entered == [0, 1, 4] and gates.waiting("a") == 2
    tasks[2].cancel()
    leave[0].set()
    async with asyncio.timeout(WAIT):
        await tasks[0]
        while len(entered) < 4:
            await asyncio.sleep(0)
    assert entered == [0, 1, 4, 3] and gates.running("a") == 2 and gates.waiting("a") == 0
    for n in (1, 3, 4):
        leave[n].set()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(tasks[1], tasks[3], other)
    assert tasks[2].cancelled()
    assert gates.running("a") == 0 and gates._gates == {}  # idle destinations are forgotten


async def test_a_destination_s_own_lower_limit_wins_and_a_higher_one_does_not() -> None:
    gates = DestinationGates(3)
    async with gates.slot("mx", 1):
        waiter = asyncio.create_task(_enter(gates, "mx", 1))
        async with asyncio.timeout(WAIT):
            while gates.waiting("mx") == 0:
                await asyncio.sleep(0)
        assert gates.running("mx") == 1
    async with asyncio.timeout(WAIT):
        await waiter
    async with gates.slot("b", 9), gates.slot("b", 9), gates.slot("b", 9):
        assert gates.running("b") == 3
        late = asyncio.create_task(_enter(gates, "b", 9))
        async with asyncio.timeout(WAIT):
            while gates.waiting("b") == 0:
                await asyncio.sleep(0)
    async with asyncio.timeout(WAIT):
        await late


async def _enter(gates: DestinationGates, key: str, limit: int) -> None:
    async with gates.slot(key, limit):
        pass


async def test_a_destination_s_turn_ends_with_its_send_and_the_slot_with_the_record(
    relay_factory: StartRelay, sink: CountingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one conversation allowed to the sink and two slots in all, the second copy is
    sent while the first one's outcome still waits for its commit; a third waits until one
    of the two is recorded, so that copies sent and not yet recorded stay at most the slots."""
    harness = await relay_factory(worker={"concurrency": 2, "destination_concurrency": 1})
    worker = harness.relay.worker
    recorded = worker._record
    commit = asyncio.Event()
    waiting: list[str] = []

    async def held_record(message: Any, deliveries: Any, *args: Any) -> None:
        waiting.append(message.id)
        await commit.wait()
        await recorded(message, deliveries, *args)

    monkeypatch.setattr(worker, "_record", held_record)
    await send_each(harness, [f"p{n}@example.com" for n in range(3)])

    try:
        gates, key = worker.destinations, key_of(harness)
        await until(lambda: len(waiting) == 2 and gates.running(key) == 1)
        assert len(sink.messages) == 2 and sink.own.most == 1
        assert worker._slots.locked()  # the third took the destination's turn, waits here
    finally:
        commit.set()
    await all_delivered_once(harness, [sink], 3)
    rows = await deliveries(harness.relay.db)
    assert all(d.attempts == 1 for d in rows)
