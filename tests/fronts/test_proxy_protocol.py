"""The SMTP front behind HAProxy: PROXY protocol v1 and v2 through real sockets.

The "proxy" connects from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback) and writes
the header itself, built here from the specification (haproxy.org/download/2.0/doc/
proxy-protocol.txt), so the relay's parsing is checked against the text, not against itself.
What must hold: the client the header names is the one every check and record sees, and a
connection without a good header, or from a peer that is no proxy, hears nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import struct
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from gateway.config import SmtpSettings
from gateway.store.models import Event
from tests.conftest import AGENT, Harness, StartRelay
from tests.fronts.test_smtp_front import (
    PROSPECT,
    TIMEOUT,
    Wire,
    assert_nothing_written,
    client_tls,
    dotted,
    plain_token,
    raw_message,
)

PROXY = "127.0.0.2"
NOT_A_PROXY = "127.0.0.3"
CLIENT = "198.51.100.7"
OTHER_CLIENT = "203.0.113.9"
CLIENT6 = "2001:db8::7"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str = CLIENT, family: str = "TCP4", port: int = 40001) -> bytes:
    target = "192.0.2.1" if family == "TCP4" else "2001:db8::1"
    return f"PROXY {family} {source} {target} {port} 587\r\n".encode()


def v2(
    source: str = CLIENT,
    *,
    command: int = 0x1,
    family_protocol: int | None = None,
    port: int = 40001,
    tlvs: bytes = b"",
    version: int = 0x2,
) -> bytes:
    """Signature, version and command, family and protocol, length, addresses, TLVs."""
    ip = ipaddress.ip_address(source)
    if ip.version == 4:
        addresses = ip.packed + ipaddress.ip_address("192.0.2.1").packed
        fam = 0x11  # AF_INET, STREAM
    else:
        addresses = ip.packed + ipaddress.ip_address("2001:db8::1").packed
        fam = 0x21  # AF_INET6, STREAM
    body = addresses + struct.pack("!HH", port, 587) + tlvs
    head = bytes([(version << 4) | command, fam if family_protocol is None else family_protocol])
    return V2_SIGNATURE + head + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


@pytest.fixture
async def proxied(relay_factory: StartRelay) -> Harness:
    return await relay_factory(
        smtp={
            "proxy_protocol": True,
            "proxy_from": [f"{PROXY}/32"],
            # the header's timeout, long enough that a loaded box's slow turn of the loop
            # does not close a connection whose header has come (a CI run saw that at 1 s)
            "proxy_timeout": 3,
            "max_auth_failures_per_ip": 2,
            "max_connections_per_ip": 1,
        }
    )


async def connect(
    relay: Harness, header: bytes, source: str = PROXY, port: int | None = None
) -> Wire:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port or relay.smtp_port, local_addr=(source, 0)),
        TIMEOUT,
    )
    wire = Wire(reader, writer)
    if header:
        await wire.write(header)
    return wire


async def greeted(relay: Harness, header: bytes, source: str = PROXY) -> Wire:
    wire = await connect(relay, header, source)
    greeting = await wire.answer()
    assert greeting.code == 220, greeting
    return wire


async def closed_silently(wire: Wire) -> None:
    """The server closed without a byte: no greeting, no 421 to a client it does not know."""
    try:
        rest = await asyncio.wait_for(wire.reader.read(), TIMEOUT)
    except ConnectionResetError:
        rest = b""
    assert rest == b""
    await wire.close()


async def logged_in(wire: Wire) -> None:
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    answer = await wire.command(f"AUTH PLAIN {plain_token()}")
    assert answer.code == 235, answer


def open_per_address(relay: Harness) -> dict[str, int]:
    return dict(relay.relay.smtp.gate.open)


async def test_the_real_client_is_in_the_received_line_and_the_journal(proxied: Harness) -> None:
    wire = await greeted(proxied, v1())
    await logged_in(wire)  # STARTTLS starts a new aiosmtpd session: the client must stay
    assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await wire.data(dotted(raw_message()))
    assert answer.code == 250, answer
    await wire.close()
    [copy] = await proxied.sink.expect(1)
    assert f"from client.example ({CLIENT}) by relay.broker.example".encode() in copy.data
    assert PROXY.encode() not in copy.data
    async with proxied.relay.db.transaction() as session:
        [event] = (
            await session.scalars(select(Event).where(Event.type == "message.received"))
        ).all()
    assert event.data["peer"] == CLIENT


HEADERS = {
    "v1 TCP4": (v1(), CLIENT),
    "v1 TCP6": (v1(CLIENT6, "TCP6"), CLIENT6),
    "v1 TCP6 IPv4-mapped": (v1(f"::ffff:{CLIENT}", "TCP6"), CLIENT),
    "v2 INET6 IPv4-mapped": (v2(f"::ffff:{CLIENT}"), CLIENT),
    "v2 INET": (v2(), CLIENT),
    "v2 INET6 with TLVs": (v2(CLIENT6, tlvs=tlv(0x04, b"") + tlv(0x05, b"id-1")), CLIENT6),
    # no client to name (HAProxy's health checks): the specification says use the peer
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", PROXY),
    "v1 UNKNOWN with addresses": (b"PROXY UNKNOWN ::1 ::1 1 2\r\n", PROXY),
    "v2 LOCAL": (v2(command=0x0), PROXY),
}


@pytest.mark.parametrize("header, client", HEADERS.values(), ids=HEADERS.keys())
async def test_each_header_form_names_the_client_the_gate_counts(
    proxied: Harness, header: bytes, client: str
) -> None:
    wire = await greeted(proxied, header)
    assert open_per_address(proxied) == {client: 1}
    await wire.ehlo()  # the session goes on normally
    assert (await wire.command("QUIT")).code == 221
    await wire.close()


async def test_the_header_may_arrive_with_the_first_command(proxied: Harness) -> None:
    wire = await connect(proxied, v2() + b"EHLO client.example\r\n")
    assert (await wire.answer()).code == 220
    assert (await wire.answer()).code == 250
    await wire.close()


BAD_HEADERS = {
    "no header": b"EHLO client.example\r\n",
    "v1 missing ports": b"PROXY TCP4 198.51.100.7 192.0.2.1\r\n",
    "v1 unknown family": b"PROXY TCP5 198.51.100.7 192.0.2.1 40001 587\r\n",
    "v1 IPv6 in TCP4": b"PROXY TCP4 2001:db8::7 192.0.2.1 40001 587\r\n",
    "v1 port out of range": b"PROXY TCP4 198.51.100.7 192.0.2.1 70000 587\r\n",
    "v1 bare LF": b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 587\n",
    "v1 over 107 bytes": b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 587" + b" " * 80 + b"\r\n",
    "v1 2000 bytes without an end": b"PROXY " + b"9" * 2000,
    "v2 version 3": v2(version=0x3),
    "v2 unknown command": v2(command=0x5),
    "v2 UDP": v2(family_protocol=0x12),
    "v2 Unix socket": v2(family_protocol=0x31) + b"\x00" * 200,
    "v2 truncated address": V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\xc6\x33\x64\x07",
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
async def test_a_bad_or_missing_header_is_answered_by_closing(
    proxied: Harness, header: bytes
) -> None:
    wire = await connect(proxied, header)
    await closed_silently(wire)
    assert open_per_address(proxied) == {}
    await assert_nothing_written(proxied)


SLOW_HEADERS = {
    "v1 never ends": b"PROXY TCP4 198.51",
    "v2 promises more": V2_SIGNATURE + b"\x21\x11\x00\xc8" + b"\x00" * 10,
    "nothing at all": b"",
}


@pytest.mark.parametrize("header", SLOW_HEADERS.values(), ids=SLOW_HEADERS.keys())
async def test_a_header_not_finished_in_time_is_closed_silently(
    proxied: Harness, header: bytes
) -> None:
    """proxy_timeout is 3 s here; the read is bounded by TIMEOUT, so a hang fails."""
    wire = await connect(proxied, header)
    await closed_silently(wire)
    assert open_per_address(proxied) == {}


async def test_a_peer_not_in_proxy_from_is_refused_even_with_a_good_header(
    proxied: Harness,
) -> None:
    wire = await connect(proxied, v1(), source=NOT_A_PROXY)
    await closed_silently(wire)
    assert open_per_address(proxied) == {}


async def test_clients_behind_one_proxy_are_counted_apart(proxied: Harness) -> None:
    """max_connections_per_ip is 1: the proxy's address must not be the one that counts."""
    first = await greeted(proxied, v1(CLIENT))
    second = await greeted(proxied, v2(OTHER_CLIENT))
    assert open_per_address(proxied) == {CLIENT: 1, OTHER_CLIENT: 1}
    third = await connect(proxied, v1(CLIENT, port=40002))
    refused = await third.answer()
    assert refused.lines == ["421 4.7.0 Too many connections from your address; try again later"]
    assert await third.closed_by_server()
    await third.close()
    for wire in (first, second):
        assert (await wire.command("QUIT")).code == 221
        await wire.close()


async def test_failed_logins_are_counted_for_the_real_client(proxied: Harness) -> None:
    """max_auth_failures_per_ip is 2: the guesser is turned away at the greeting, while
    another client behind the same proxy still logs in."""
    guesser = await greeted(proxied, v1(CLIENT))
    await guesser.ehlo()
    await guesser.starttls()
    await guesser.ehlo()
    for _ in range(2):
        answer = await guesser.command(f"AUTH PLAIN {plain_token(AGENT, 'wrong')}")
        assert answer.code == 535, answer
    await guesser.close()
    throttle = proxied.relay.smtp.throttle.per_address
    assert throttle.level(CLIENT) > 1.5
    assert throttle.level(PROXY) == 0

    again = await connect(proxied, v1(CLIENT, port=40003))
    refused = await again.answer()
    assert refused.lines == ["421 4.7.0 Too many failed logins from your address; try again later"]
    await again.close()

    agent = await greeted(proxied, v2(OTHER_CLIENT))
    await logged_in(agent)
    assert throttle.trusted(OTHER_CLIENT) and not throttle.trusted(PROXY)
    await agent.close()


class _Seen(logging.Handler):
    """Sets `event` when the front logs that it handles a connection: the moment a
    connection waiting for its header exists on the relay's side."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "handling connection" in record.getMessage():
            self.event.set()


async def test_stopping_the_front_closes_a_connection_still_waiting_for_its_header(
    relay_factory: StartRelay,
) -> None:
    """The header wait (60 s here) must not hold the connection past the relay's stop."""
    relay = await relay_factory(
        smtp={
            "implicit_tls_listen": [],
            "proxy_protocol": True,
            "proxy_from": [PROXY],
            "proxy_timeout": 60,
        }
    )
    seen = _Seen()
    front_log = logging.getLogger("gateway.fronts.smtp_protocol")
    level = front_log.level
    front_log.addHandler(seen)
    front_log.setLevel(logging.DEBUG)
    try:
        wire = await connect(relay, b"PROX")
        await asyncio.wait_for(seen.event.wait(), TIMEOUT)
    finally:
        front_log.removeHandler(seen)
        front_log.setLevel(level)
    await asyncio.wait_for(relay.relay.smtp.stop(), TIMEOUT)
    await closed_silently(wire)


BAD_SETTINGS = {
    "without proxy_from": {"proxy_protocol": True},
    "not a network": {"proxy_protocol": True, "proxy_from": ["haproxy.internal"]},
}


@pytest.mark.parametrize("values", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_settings_that_cannot_work_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SmtpSettings.model_validate(values)


def test_settings_that_work() -> None:
    smtp = SmtpSettings.model_validate(
        {"proxy_protocol": True, "proxy_from": ["10.0.0.0/8", "fd00::/8"], "proxy_timeout": 5}
    )
    assert smtp.proxy_from == ["10.0.0.0/8", "fd00::/8"]


# -- implicit TLS (port 465 style): the header comes first, in clear, then the handshake


async def test_implicit_tls_after_the_header_takes_mail_from_the_real_client(
    proxied: Harness,
) -> None:
    wire = await connect(proxied, v2(), port=proxied.tls_port)
    await asyncio.wait_for(wire.writer.start_tls(client_tls()), TIMEOUT)
    greeting = await wire.answer()
    assert greeting.code == 220, greeting
    assert open_per_address(proxied) == {CLIENT: 1}
    await wire.ehlo()
    assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
    assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    assert (await wire.data(dotted(raw_message()))).code == 250
    await wire.close()
    [copy] = await proxied.sink.expect(1)
    assert f"from client.example ({CLIENT}) by relay.broker.example".encode() in copy.data
    assert b"with ESMTPSA" in copy.data


async def test_implicit_tls_client_hello_in_the_same_packet_as_the_header(
    proxied: Harness,
) -> None:
    """HAProxy forwards the client's first bytes right behind the header; the relay has read
    them with the header and must hand them to the TLS layer, or the handshake hangs."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxied.tls_port, local_addr=(PROXY, 0)), TIMEOUT
    )
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(v1() + outgoing.read())  # one write: header and ClientHello together
    received = b""
    for _ in range(100):  # a handshake is a few round trips, one or more reads each
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()  # nothing once it is done
            received += tls.read(4096)
        if outgoing.pending:
            writer.write(outgoing.read())
        if received.endswith(b"\r\n"):
            break
        data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        assert data, f"closed during the handshake, after {received!r}"
        incoming.write(data)
    assert received.startswith(b"220 relay.broker.example"), received
    assert open_per_address(proxied) == {CLIENT: 1}
    writer.close()


async def test_implicit_tls_plain_text_after_the_header_ends_the_connection(
    proxied: Harness,
) -> None:
    wire = await connect(proxied, v1() + b"EHLO client.example\r\n", port=proxied.tls_port)
    try:
        rest = await asyncio.wait_for(wire.reader.read(), TIMEOUT)
    except ConnectionResetError:
        rest = b""
    assert not rest.startswith(b"220") and b"250" not in rest  # at most a TLS alert
    await wire.close()
    await assert_nothing_written(proxied)
    # the failed session left the gate: the client's one place (max_connections_per_ip) is free
    again = await greeted(proxied, v1(port=40004))
    assert open_per_address(proxied) == {CLIENT: 1}
    await again.close()
