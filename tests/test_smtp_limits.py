"""The SMTP front under slow clients and floods, through real sockets.

A slow but steady client must get its 250; a silent one a 421. Floods of connections and of
failed logins are refused early, per client address, so that an agent from another address
is neither locked out nor slowed. Clients take their own source address from 127.0.0.0/8
(Linux routes the whole block to loopback), which is how one test plays several hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.conftest import AGENT, Harness, StartRelay
from tests.test_smtp_front import (
    PROSPECT,
    TIMEOUT,
    Answer,
    Wire,
    assert_nothing_written,
    dotted,
    plain_token,
    raw_message,
)

AGENT_IP = "127.0.0.1"


async def connect(port: int, source: str) -> Wire:
    """A raw connection from `source`, greeting not yet read."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
    )
    return Wire(reader, writer)


async def greeted(port: int, source: str) -> Wire:
    wire = await connect(port, source)
    greeting = await wire.answer()
    assert greeting.code == 220, greeting
    return wire


async def logged_in(relay: Harness, source: str = AGENT_IP) -> Wire:
    wire = await greeted(relay.smtp_port, source)
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    answer = await wire.command(f"AUTH PLAIN {plain_token()}")
    assert answer.code == 235, answer
    return wire


async def started_tls(relay: Harness, source: str) -> Wire:
    wire = await greeted(relay.smtp_port, source)
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    return wire


@contextlib.asynccontextmanager
async def wires() -> AsyncIterator[list[Wire]]:
    """Connections that are all closed at the end, however the test ends."""
    opened: list[Wire] = []
    try:
        yield opened
    finally:
        await asyncio.gather(*(w.close() for w in opened), return_exceptions=True)


async def refused_at_greeting(port: int, source: str) -> Answer:
    """The reply a connection gets instead of 220; the server must close it after."""
    wire = await connect(port, source)
    try:
        answer = await wire.answer()
        assert await wire.closed_by_server()
        return answer
    finally:
        await wire.close()


# -- item 12: the timeout is client silence, not the length of a transfer


async def test_slow_steady_data_longer_than_the_timeout_gets_250(
    relay_factory: StartRelay,
) -> None:
    timeout = 2.0
    relay = await relay_factory(smtp={"timeout": timeout})
    wire = await logged_in(relay)
    try:
        assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        assert (await wire.command("DATA")).code == 354
        body = b"".join(b"line %03d of a slow upload\r\n" % n for n in range(20))
        payload = dotted(raw_message(body=body))
        pieces = [payload[i : i + 40] for i in range(0, len(payload), 40)]
        # a piece every 0.4 s: never silent for long, but the whole transfer takes ~7 s
        pace = timeout / 5
        assert pace * len(pieces) > 3 * timeout
        for piece in pieces:
            await wire.write(piece)
            await asyncio.sleep(pace)
        answer = await wire.answer()
        assert answer.code == 250 and "queued as" in answer.text, answer
        [copy] = await relay.sink.expect(1)
        assert b"line 019 of a slow upload" in copy.data
    finally:
        await wire.close()


@pytest.mark.parametrize("phase", ["during-data", "between-commands"])
async def test_a_silent_client_gets_421_timeout_and_nothing_is_stored(
    relay_factory: StartRelay, phase: str
) -> None:
    relay = await relay_factory(smtp={"timeout": 1.0})
    wire = await logged_in(relay)
    try:
        if phase == "during-data":
            assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
            assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
            assert (await wire.command("DATA")).code == 354
            await wire.write(raw_message()[:30])
        answer = await wire.answer()  # bounded by TIMEOUT; the relay must speak first
        assert answer.code == 421, answer
        assert answer.lines[0].startswith("421 4.4.2 "), answer
        assert "timeout" in answer.text.lower()
        assert await wire.closed_by_server()
    finally:
        await wire.close()
    await assert_nothing_written(relay)
