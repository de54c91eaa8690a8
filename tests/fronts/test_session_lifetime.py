"""An SMTP session is freed as soon as it ends, by reference counting alone.

A session left in reference cycles waits for the garbage collector's full passes, which
stop the event loop for every session in flight (gateway/fronts/smtp.py
`SubmissionSMTP._let_go`). Each case runs with the collector off: a session still alive
once it has ended is in a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway.fronts.smtp import SubmissionSMTP
from tests.conftest import Harness, StartRelay
from tests.fronts.test_smtp_front import Wire, assert_nothing_written, dotted, raw_message
from tests.fronts.test_spool import logged_in

TURNS = 200  # loop turns, 10 ms apart, for an ended session's task to unwind


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def the_session(relay: Harness) -> weakref.ref[SubmissionSMTP]:
    [session] = [s for s in relay.relay.smtp.gate.sessions if isinstance(s, SubmissionSMTP)]
    return weakref.ref(session)


async def freed(session: weakref.ref[SubmissionSMTP]) -> bool:
    ended = session()
    if ended is not None:  # else freed already
        await asyncio.wait_for(ended.closed.wait(), 15)
        del ended
    for _ in range(TURNS):
        if session() is None:
            return True
        await asyncio.sleep(0.01)
    return False


async def left_alone(count: int) -> bool:
    """Whether, within TURNS, `count` SMTP sessions are left in memory."""
    for _ in range(TURNS):
        if sum(isinstance(o, SubmissionSMTP) for o in gc.get_objects()) == count:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.usefixtures("no_collector")
async def test_a_session_that_sent_mail_and_said_quit_is_freed(relay: Harness) -> None:
    wire = await logged_in(relay)  # and MAIL, RCPT
    session = the_session(relay)
    assert (await wire.data(dotted(raw_message()))).code == 250
    assert (await wire.command("QUIT")).code == 221
    await wire.close()
    assert await freed(session)
    await relay.sink.expect(1)


@pytest.mark.usefixtures("no_collector")
async def test_a_session_cut_off_mid_transaction_is_freed(relay: Harness) -> None:
    """The client goes away after RCPT, between commands: the transport, the timer and
    the gate each refer back to the session until it lets go of them."""
    wire = await logged_in(relay)
    session = the_session(relay)
    wire.writer.transport.abort()
    assert await freed(session)
    await assert_nothing_written(relay)


@pytest.mark.usefixtures("no_collector")
async def test_a_session_cut_off_during_data_is_freed(relay: Harness) -> None:
    """DATA's task is cancelled; a CancelledError raised out of it would hold its frames."""
    wire = await logged_in(relay)
    session = the_session(relay)
    assert (await wire.command("DATA")).code == 354
    await wire.write(b"Subject: half\r\n\r\nhalf a message")
    wire.writer.transport.abort()
    assert await freed(session)
    await assert_nothing_written(relay)


@pytest.mark.usefixtures("no_collector")
async def test_a_session_refused_at_the_gate_is_freed(relay_factory: StartRelay) -> None:
    relay = await relay_factory(smtp={"max_connections_per_ip": 1})
    admitted = await Wire.open(relay.smtp_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    refusal = await asyncio.wait_for(reader.read(), 15)  # 421, then the relay closes
    assert refusal.startswith(b"421 "), refusal
    writer.close()
    assert await left_alone(1), "the refused session is still in memory"
    await admitted.close()


@pytest.mark.usefixtures("no_collector")
async def test_a_session_whose_starttls_handshake_fails_is_freed(relay: Harness) -> None:
    """No handshake done, the TLS layer never calls the session's connection_lost: the
    session ends and lets go by itself, and leaves the gate."""
    wire = await Wire.open(relay.smtp_port)
    await wire.ehlo()
    session = the_session(relay)
    assert (await wire.command("STARTTLS")).code == 220
    await wire.write(b"this is no TLS ClientHello\r\n" * 20)
    assert await freed(session)
    assert not relay.relay.smtp.gate.sessions
    await wire.close()


@pytest.mark.usefixtures("no_collector")
async def test_a_session_whose_tls_after_a_proxy_header_fails_is_freed(
    relay_factory: StartRelay,
) -> None:
    """The same on an implicit-TLS listener behind a proxy, where the handshake follows
    the PROXY header: plain text in place of a ClientHello."""
    relay = await relay_factory(
        smtp={"proxy_protocol": True, "proxy_from": ["127.0.0.1/32"], "proxy_timeout": 5}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.tls_port)
    writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 465\r\nEHLO client.example\r\n")
    with contextlib.suppress(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 15)  # at most a TLS alert, then the close
    writer.close()
    assert await left_alone(0), "the session is still in memory"
    assert not relay.relay.smtp.gate.sessions
