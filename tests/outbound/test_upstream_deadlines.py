"""An upstream that stops reading must never stall delivery: every step has a deadline.

The upstream is a real SMTP server that answers 354 to DATA for one recipient and then stops
reading from the socket, so the relay's writes fill the buffers and its drain never returns
(what a hung or hostile receiver does). Mail to everyone else must keep leaving meanwhile;
the stalled copy must be deferred at the write deadline and delivered once the receiver
reads again. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email.policy
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import Event
from tests.conftest import Harness, StartRelay, make_message
from tests.support import Sink, free_port

SLOW = "slow@example.net"
FAST = "fast@example.com"
BIG = os.urandom(8 * 1024 * 1024)  # more than the socket buffers of both ends hold
WRITE_TIMEOUT = 2.0


@dataclass
class StallingSink(Sink):
    """A recording sink that, for the recipients in `stall_for`, stops reading after 354."""

    stall_for: set[str] = field(default_factory=set)
    stalls: int = 0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, port: int | None = None) -> StallingSink:
        loop = asyncio.get_running_loop()
        self.port = port or self.port or free_port()
        sink = self

        class Stalling(SMTP):
            async def smtp_DATA(self, arg: str) -> None:
                if self.envelope is None or not sink.stall_for & set(self.envelope.rcpt_tos):
                    await super().smtp_DATA(arg)
                    return
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                assert self.transport is not None
                self.transport.pause_reading()
                sink.stalls += 1
                sink.stalled.set()
                await sink.release.wait()
                if self.transport is not None:
                    self.transport.abort()

        def make() -> SMTP:
            return Stalling(self, hostname="sink.test", decode_data=False, data_size_limit=None)

        self._server = await loop.create_server(make, "127.0.0.1", self.port)
        return self


@pytest.fixture
async def sink() -> AsyncIterator[StallingSink]:
    server = await StallingSink().start()
    yield server
    server.release.set()
    await server.stop()


@pytest.fixture
async def relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory(
        smtp={"max_message_size": 20 * 1024 * 1024},
        upstream={"timeout": WRITE_TIMEOUT},
        policy={"link_attachments_over": "1TiB", "link_total_over": "1TiB"},
    )


def big_message() -> bytes:
    message = make_message(to=SLOW, subject="Großes Exposé")
    message.add_attachment(BIG, maintype="application", subtype="pdf", filename="expose.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


async def deferrals(relay: Harness, recipient: str) -> list[Event]:
    async with relay.relay.db.transaction() as session:
        events = await session.scalars(
            select(Event).where(Event.type == "delivery.deferred").order_by(Event.id)
        )
        return [e for e in events if e.data.get("recipient") == recipient]


async def test_an_upstream_that_stops_reading_during_data_blocks_nobody(
    relay: Harness, sink: StallingSink
) -> None:
    sink.stall_for.add(SLOW)
    big = big_message()
    await relay.send(big, recipients=[SLOW])
    async with asyncio.timeout(30):
        await sink.stalled.wait()

    await relay.send(make_message(to=FAST, subject="Kurze Frage"))
    [fast] = await sink.expect(1)  # leaves while the big copy hangs in DATA
    assert fast.rcpt_tos == [FAST]

    async with asyncio.timeout(30):
        while not (deferred := await deferrals(relay, SLOW)):
            await asyncio.sleep(0.05)
    assert "127.0.0.1" in deferred[0].data["error"]

    sink.stall_for.clear()
    arrived = await sink.expect(2, timeout=60)
    [slow] = [m for m in arrived if m.rcpt_tos == [SLOW]]
    assert slow.data.endswith(big)
    assert sink.stalls >= 1


@dataclass
class SlowSink(Sink):
    """A recording sink that takes `delay` seconds over each reply to MAIL, RCPT and DATA."""

    delay: float = 0.0

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(self.delay)
        envelope.mail_from, envelope.mail_options = address, list(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def slow_sink() -> AsyncIterator[SlowSink]:
    server = await SlowSink(delay=1.0).start()
    yield server
    await server.stop()


async def test_a_conversation_over_its_whole_deadline_is_deferred(
    relay_factory: StartRelay, slow_sink: SlowSink, database: Database
) -> None:
    # Each reply comes well within `timeout`; all three together overrun the conversation's
    # deadline, session_timeout plus size / min_transfer_rate (about 1.5 s here).
    relay = await relay_factory(
        upstream={
            "url": f"smtp://127.0.0.1:{slow_sink.port}",
            "timeout": 10,
            "session_timeout": 1.5,
            "min_transfer_rate": 1e9,
        }
    )
    await relay.send(make_message(to=FAST))
    async with asyncio.timeout(30):
        while not (deferred := await deferrals(relay, FAST)):
            await asyncio.sleep(0.05)
    assert "deadline 2 s" in deferred[0].data["error"], deferred[0].data
    slow_sink.delay = 0
    [copy] = await slow_sink.expect(1)
    assert copy.rcpt_tos == [FAST]


async def test_each_reply_has_its_own_deadline_on_a_kept_connection(
    relay_factory: StartRelay, slow_sink: SlowSink
) -> None:
    """Replies 0.4 s apart, each well within the 1 s reply timeout, three per copy and
    copies one after another on one kept connection: the connection's one watchdog timer
    fires while a later reply is still within its own time, and must wait for that."""
    slow_sink.delay = 0.4
    relay = await relay_factory(
        upstream={"url": f"smtp://127.0.0.1:{slow_sink.port}", "timeout": 1.0}
    )
    for number in range(2):
        await relay.send(make_message(to=FAST, subject=f"Frage {number}"))
        copies = await slow_sink.expect(number + 1)
        assert [c.rcpt_tos for c in copies] == [[FAST]] * (number + 1)
    assert await deferrals(relay, FAST) == []


async def test_a_reply_that_does_not_come_in_time_defers_the_copy(
    relay_factory: StartRelay, slow_sink: SlowSink
) -> None:
    slow_sink.delay = 1.5
    relay = await relay_factory(
        upstream={"url": f"smtp://127.0.0.1:{slow_sink.port}", "timeout": 0.5}
    )
    await relay.send(make_message(to=FAST))
    async with asyncio.timeout(30):
        while not (deferred := await deferrals(relay, FAST)):
            await asyncio.sleep(0.05)
    assert "no reply in time" in deferred[0].data["error"], deferred[0].data
