"""Leases that are short and renewed: no copy is sent twice because it took long, and after a
crash nothing waits long for a dead worker's claims. SQLite and PostgreSQL.

The upstream holds its reply to the end of DATA until the test opens a gate, so copies stay
in flight as long as the test needs, the way a slow receiver keeps them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from gateway.outbound.delivery import DeliveryWorker
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, make_message
from tests.store.test_durability import (
    RelayProcess,
    burst_message,
    message_ids,
)
from tests.support import Sink

LEASE = 0.6
RESTART_DEADLINE = 60.0


@dataclass
class GatedSink(Sink):
    """A recording sink that answers the end of DATA only once `gate` is open."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.waiting += 1
        self.arrived.set()
        await self.gate.wait()
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def sink() -> AsyncIterator[GatedSink]:
    server = await GatedSink().start()
    yield server
    server.gate.set()
    await server.stop()


async def the_delivery(db: Database) -> Delivery:
    async with db.transaction() as session:
        [delivery] = (await session.scalars(select(Delivery))).all()
        return delivery


async def test_a_copy_in_flight_longer_than_its_lease_is_never_taken_over(
    relay_factory: StartRelay, sink: GatedSink, database: Database
) -> None:
    harness: Harness = await relay_factory(
        worker={"lease_seconds": LEASE}, upstream={"timeout": 30}
    )
    relay = harness.relay
    other = DeliveryWorker(
        harness.settings,
        database,
        relay.blobs,
        relay.worker.routes,
        relay.worker.signer,
        relay.signal,
    )
    stop = asyncio.Event()
    second = asyncio.create_task(other.run(stop))
    try:
        await harness.send(make_message(to="p@example.com"))
        async with asyncio.timeout(30):
            await sink.arrived.wait()
        first = await the_delivery(database)
        assert first.lease_until is not None
        # Wait until the holder has renewed its lease past three of its original lengths.
        renewed_past = first.lease_until + timedelta(seconds=3 * LEASE)
        async with asyncio.timeout(20):
            while (lease := (await the_delivery(database)).lease_until) is None or (
                lease < renewed_past
            ):
                await asyncio.sleep(0.05)
        assert sink.waiting == 1  # the other worker never took the copy over
        sink.gate.set()
        [copy] = await sink.expect(1)
        assert copy.rcpt_tos == ["p@example.com"]
        async with asyncio.timeout(20):
            while (delivered := await the_delivery(database)).status != DeliveryStatus.DELIVERED:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        relay.signal.notify()
        await second
    assert delivered.attempts == 1 and delivered.leased_by is None
    assert sink.waiting == 1 and len(sink.messages) == 1


@pytest.fixture
async def relay_process(
    database_url: str,
    sink: GatedSink,
    tmp_path: Path,
) -> AsyncIterator[RelayProcess]:
    """`sealrelay serve` with the shipped worker settings (lease and all)."""
    relay = RelayProcess(tmp_path, database_url, sink.port)
    relay.write_config()
    shipped = relay.config.read_text().replace("lease_seconds = 2\n", "")
    relay.config.write_text(shipped)
    await relay.add_agent()
    try:
        yield relay
    finally:
        await relay.stop()


@pytest.mark.slow
async def test_after_a_kill_every_accepted_message_is_delivered_within_a_minute(
    relay_process: RelayProcess, sink: GatedSink
) -> None:
    await relay_process.start()
    accepted = set()
    async with asyncio.timeout(60):
        for number in range(10):
            message_id, message = burst_message("restart", number)
            await aiosmtplib.send(
                message,
                hostname="127.0.0.1",
                port=relay_process.smtp_port,
                username=AGENT,
                password=PASSWORD,
                start_tls=False,
            )
            accepted.add(message_id)
        await sink.arrived.wait()  # copies are claimed and in flight
    relay_process.kill()
    assert await relay_process.wait_exit() == -signal.SIGKILL
    assert not sink.messages

    sink.gate.set()
    await relay_process.start()
    restarted = datetime.now()
    async with asyncio.timeout(RESTART_DEADLINE):
        while not accepted <= set(message_ids(sink)):
            await asyncio.sleep(0.1)
    print(f"\n[restart] delivered {len(accepted)} in {datetime.now() - restarted}")
