"""The front's own SMTP protocol: pipelining, back-pressure, framing across pieces, STARTTLS.

Framing is tested by calling the protocol with pieces cut where the test says (a transport
of our own records what it writes), so no test depends on how TCP happens to cut the bytes;
STARTTLS with a real connection and handshake.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from gateway.fronts.proxy_header import header_length
from gateway.fronts.smtp_protocol import KEPT_WHILE_BUSY, LINE_LIMIT, Listener, SubmissionSMTP
from gateway.fronts.smtp_replies import Reply
from tests.conftest import AGENT, Harness, StartRelay
from tests.fronts.test_smtp_front import (
    PROSPECT,
    TIMEOUT,
    Wire,
    assert_nothing_written,
    b64,
    client_tls,
    dotted,
    plain_token,
    raw_message,
)

PEER = ("127.0.0.1", 40123)
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"


class Transport:
    """What a session writes, and whether it reads, for a session driven by the test."""

    def __init__(self, peer: tuple[str, int] = PEER) -> None:
        self.peer = peer
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.wrote = asyncio.Event()
        self.paused = asyncio.Event()
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes) -> None:
        self.written += data
        self.wrote.set()

    def close(self) -> None:
        """As a real transport: the session hears of it on the loop's next turn."""
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False
        self.paused.set()

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def lines(self) -> list[str]:
        return self.written.decode().splitlines()

    async def replies(self, count: int) -> list[str]:
        """The last line of each of the first `count` replies, once written."""
        while True:
            done = [line for line in self.lines() if line[3:4] != "-"]
            if len(done) >= count:
                return done[:count]
            self.wrote.clear()
            await asyncio.wait_for(self.wrote.wait(), TIMEOUT)


def connected(relay: Harness, **changes: Any) -> tuple[SubmissionSMTP, Transport]:
    """A session of the relay's front on a transport of the test's."""
    front = relay.relay.smtp
    listener = Listener(
        handler=front.handler,
        gate=front.gate,
        hostname=relay.settings.server.hostname,
        timeout=relay.settings.smtp.timeout,
        size_limit=relay.settings.smtp.max_message_size,
        spool_dir=front.spool_dir,
        **changes,
    )
    session = SubmissionSMTP(listener)
    transport = Transport()
    transport.protocol = session
    session.connection_made(transport)  # type: ignore[arg-type]
    return session, transport


def session_on(relay: Harness, **changes: Any) -> tuple[SubmissionSMTP, Transport]:
    """`connected`, and greeted."""
    session, transport = connected(relay, **changes)
    assert transport.lines()[0].startswith("220 "), transport.lines()
    transport.written.clear()
    return session, transport


def fed(session: SubmissionSMTP, data: bytes, size: int) -> None:
    for index in range(0, len(data), size):
        session.data_received(data[index : index + size])


LOGIN = f"EHLO client.example\r\nAUTH PLAIN {plain_token()}\r\n".encode()


async def test_pipelined_commands_are_answered_in_order_around_the_busy_ones(
    relay: Harness,
) -> None:
    """AUTH and DATA wait for the relay; the commands behind them are kept, not read,
    and their replies follow in order."""
    session, transport = session_on(relay)
    message = dotted(raw_message())
    envelope = f"MAIL FROM:<{AGENT}>\r\nRCPT TO:<{PROSPECT}>\r\nDATA\r\n".encode()
    session.data_received(LOGIN + envelope + message + envelope + message + b"NOOP\r\nQUIT\r\n")
    replies = await transport.replies(12)
    assert [reply[:3] for reply in replies] == [
        "250",  # EHLO
        "235",
        "250",
        "250",
        "354",
        "250",  # queued
        "250",
        "250",
        "354",
        "250",  # queued
        "250",  # NOOP
        "221",
    ], replies
    assert "queued as" in replies[5] and "queued as" in replies[9]
    assert transport.closed
    await relay.sink.expect(2)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
async def test_the_end_of_data_split_across_pieces(relay: Harness, size: int) -> None:
    """CRLF.CRLF is found wherever the pieces cut it, and what follows it is commands."""
    session, transport = session_on(relay)
    session.data_received(LOGIN)
    await transport.replies(2)
    envelope = f"MAIL FROM:<{AGENT}>\r\nRCPT TO:<{PROSPECT}>\r\nDATA\r\n".encode()
    fed(session, envelope + dotted(raw_message(body=b".dot\r\n")) + b"NOOP\r\n", size)
    replies = await transport.replies(7)
    assert replies[4].startswith("354 ") and replies[6] == "250 2.0.0 OK", replies
    assert replies[5].startswith("250 2.0.0 Ok: queued as"), replies
    [copy] = await relay.sink.expect(1)
    assert b"\r\n.dot\r\n" in copy.data and b"NOOP" not in copy.data
    transport.close()


def cut_at_random(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` in 1 to 40 pieces, cut where `rng` says."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
    return [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def test_transactions_cut_anywhere_are_read_alike(relay: Harness) -> None:
    """Envelope, data and the command after it, cut into pieces where a seeded random
    says (a CR apart from its LF, a dot apart from its line, the end of data across three
    pieces): every cutting gives the same replies and relays the same body."""
    bodies = [
        b".a dot at a line's start\r\n..two\r\n.\r\nnot the end\r\n",
        b"\r\n\r\n. \r\nTschuess\r\n",
    ]
    envelope = f"MAIL FROM:<{AGENT}>\r\nRCPT TO:<{PROSPECT}>\r\nDATA\r\n".encode()
    rng = random.Random(18)
    for turn in range(12):
        session, transport = session_on(relay)
        session.data_received(LOGIN)
        await transport.replies(2)
        for number, body in enumerate(bodies):
            for piece in cut_at_random(
                envelope + dotted(raw_message(body=body)) + b"NOOP\r\n", rng
            ):
                session.data_received(piece)
            replies = await transport.replies(2 + 5 * (number + 1))
            assert [reply[:4] for reply in replies[-5:]] == ["250 ", "250 ", "354 ", "250 ", "250 "]
            assert replies[-2].startswith("250 2.0.0 Ok: queued as "), replies
        transport.close()
        copies = await relay.sink.expect(2 * (turn + 1))
        got = [copy.data.split(b"\r\n\r\n", 1)[1] for copy in copies[-2:]]
        assert sorted(got) == sorted(bodies), turn  # delivered in either order


async def test_an_endless_answer_to_an_auth_challenge_is_not_kept(relay: Harness) -> None:
    """A client that never ends its answer to a 334 does not fill the relay's memory: the
    octets past a line's bound are thrown away as they come, the answer is refused once its
    line ends, and the session is still in step."""
    session, transport = session_on(relay)
    session.data_received(b"EHLO client.example\r\nAUTH LOGIN\r\n")
    assert (await transport.replies(2))[1].startswith("334 ")
    for _ in range(100):
        session.data_received(b"QUJD" * 2500)  # 10 KB a piece, no line end
        assert len(session._buffer) <= 2 * LINE_LIMIT + 10_000
    session.data_received(b"QUJD\r\nNOOP\r\n")
    replies = await transport.replies(4)
    assert replies[2:] == ["500 5.5.6 Authentication Exchange line is too long", "250 2.0.0 OK"]
    assert session.agent is None
    transport.close()


@pytest.mark.parametrize("quads", [250, 251])  # a line of 1001 octets before its LF, 1005
async def test_an_auth_answer_is_judged_alike_in_one_piece_or_many(
    relay: Harness, quads: int
) -> None:
    """An answer to a 334 is taken or refused by its length alone, as a command line is, not
    by how the network cut it: in one piece with its line end, or a few octets at a time."""
    answer = b"QUJD" * quads + b"\r\n"
    said = []
    for size in (len(answer), 7):
        session, transport = session_on(relay)
        session.data_received(b"EHLO client.example\r\nAUTH LOGIN\r\n")
        assert (await transport.replies(2))[1].startswith("334 ")
        for start in range(0, len(answer), size):
            session.data_received(answer[start : start + size])
        said.append((await transport.replies(3))[2])
        transport.close()
    too_long = "500 5.5.6 Authentication Exchange line is too long"
    if len(answer) - 1 > LINE_LIMIT:
        assert said == [too_long, too_long]
    else:
        assert said[0] == said[1] != too_long and said[0].startswith("334 "), said


async def test_reading_pauses_while_a_busy_command_leaves_input_waiting(
    relay: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a login is checked, the client's pipelined commands are kept up to a bound;
    past it the session stops reading, and reads again once it has caught up."""
    release = asyncio.Event()
    handler = relay.relay.smtp.handler
    checked = handler.authenticate

    async def held(session: SubmissionSMTP, mechanism: str, args: list[str]) -> None:
        await release.wait()
        await checked(session, mechanism, args)

    monkeypatch.setattr(handler, "authenticate", held)
    session, transport = session_on(relay)
    session.data_received(LOGIN)
    await transport.replies(1)
    noops = KEPT_WHILE_BUSY // len(b"NOOP\r\n") + 100
    fed(session, b"NOOP\r\n" * noops, 4096)
    await asyncio.wait_for(transport.paused.wait(), TIMEOUT)
    assert "250 2.0.0 OK" not in transport.lines()  # the NOOPs wait behind the login
    release.set()
    replies = await transport.replies(2 + noops)
    assert replies[1].startswith("235 ") and replies[2:] == ["250 2.0.0 OK"] * noops
    assert transport.reading
    transport.close()


@pytest.mark.parametrize("size", [1, 5, 12, 13, 16, 17])
def test_a_proxy_header_is_found_whatever_the_pieces(size: int) -> None:
    v1 = b"PROXY TCP4 192.0.2.7 192.0.2.1 40001 25\r\n"
    v2 = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 7, 192, 0, 2, 1])
        + (40001).to_bytes(2, "big")
        + (25).to_bytes(2, "big")
    )
    for header in (v1, v2):
        for cut in range(0, len(header), size):
            assert header_length(header[:cut]) is None, cut  # more is needed to tell
        assert header_length(header + b"EHLO x\r\n") == len(header)
    assert header_length(b"EHLO x\r\n") == 0
    assert header_length(b"PROXY " + b"x" * 200) == 0  # no end within a v1 header's bound


@pytest.mark.parametrize("size", [1, 4, 9, 50])
async def test_a_proxy_header_in_pieces_names_the_client(
    relay_factory: StartRelay, size: int
) -> None:
    relay = await relay_factory(
        smtp={"implicit_tls_listen": [], "proxy_protocol": True, "proxy_from": ["127.0.0.1"]}
    )
    session, transport = connected(relay, proxy=relay.relay.smtp.proxy)
    assert transport.written == b""  # nothing is said before the header
    fed(session, b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\nNOOP\r\n", size)
    assert await transport.replies(2) == [transport.lines()[0], "250 2.0.0 OK"]
    assert transport.lines()[0].startswith("220 ")
    assert session.peer == ("192.0.2.7", 40001)
    transport.close()


async def test_commands_behind_starttls_in_the_same_packet_are_never_read(
    relay: Harness,
) -> None:
    """RFC 3207: plain text after STARTTLS is thrown away, never read as commands once
    TLS is up (the injection of CVE-2011-0411)."""
    wire = await Wire.open(relay.smtp_port)
    try:
        await wire.ehlo()
        await wire.write(
            b"STARTTLS\r\nEHLO evil.example\r\nAUTH PLAIN " + b64("x").encode() + b"\r\n"
        )
        assert (await wire.answer()).lines == ["220 2.0.0 Ready to start TLS"]
        await asyncio.wait_for(wire.writer.start_tls(client_tls()), TIMEOUT)
        assert (await wire.command("NOOP")).lines == ["250 2.0.0 OK"]  # no reply was left over
        assert (await wire.command(f"MAIL FROM:<{AGENT}>")).lines == [
            "503 5.5.1 Error: send HELO first"
        ]  # the session started over: the smuggled EHLO was not read
        await wire.ehlo()
        assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
    finally:
        await wire.close()
    await assert_nothing_written(relay)


async def test_a_connection_lost_mid_data_stores_nothing(relay: Harness) -> None:
    session, transport = session_on(relay)
    session.data_received(LOGIN)
    await transport.replies(2)
    envelope = f"MAIL FROM:<{AGENT}>\r\nRCPT TO:<{PROSPECT}>\r\nDATA\r\n".encode()
    session.data_received(envelope + b"Subject: half\r\n\r\nhalf a message\r\n")
    assert (await transport.replies(5))[4].startswith("354 ")
    receiving = session._busy
    assert receiving is not None
    session.connection_lost(ConnectionResetError())
    assert session.closed.is_set()
    await asyncio.wait_for(asyncio.wait([receiving]), TIMEOUT)
    await assert_nothing_written(relay)


@pytest.mark.parametrize(
    ("changes", "wire", "replies"),
    [
        ({}, b"MAIL FROM:<a@b.example>\r\n", ["503 5.5.1 Error: send HELO first"]),
        ({}, b"AUTH PLAIN\r\n", ["503 5.5.1 Error: send EHLO first"]),
        ({}, b"HELO\r\n", ["501 5.5.4 Syntax: HELO hostname"]),
        (
            {},
            b"HELO x\r\nAUTH PLAIN\r\n",
            ["250 ", "500 5.5.1 Error: command 'AUTH' not recognized"],
        ),
        ({}, b"EHLO x\r\nSTARTTLS\r\n", ["250 HELP", "454 4.7.0 TLS not available"]),
        (
            {},
            b"EHLO x\r\nNOOP \xff\r\n",
            ["250 HELP", "500 5.5.2 Error: only ASCII is accepted in commands"],
        ),
        (
            {},
            b"EHLO x\r\n" + b"NOOP " + b"x" * 600 + b"\r\n",
            ["250 HELP", "500 5.5.2 Error: command line too long"],
        ),
        (
            {},
            b"EHLO x\r\nAUTH\r\n",
            ["250 HELP", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"],
        ),
        (
            {},
            b"EHLO x\r\nAUTH PLAIN a b\r\n",
            ["250 HELP", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"],
        ),
        (
            {},
            b"EHLO x\r\nAUTH CRAM-MD5\r\n",
            ["250 HELP", "504 5.5.4 Unrecognized authentication type"],
        ),
        (
            {},
            b"EHLO x\r\nAUTH LOGIN\r\n*\r\n",
            ["250 HELP", "334 VXNlciBOYW1lAA==", "501 5.7.0 Auth aborted"],
        ),
        (
            {},
            b"EHLO x\r\nAUTH LOGIN\r\n!!\r\n",
            ["250 HELP", "334 VXNlciBOYW1lAA==", "501 5.5.2 Can't decode base64"],
        ),
        ({}, b"EHLO x\r\nEXPN x\r\n", ["250 HELP", "502 5.5.1 EXPN not implemented"]),
        (
            {},
            "EHLO x\r\nMAIL FROM:<jörg@b.example>\r\nRCPT TO:<p@bücher.example>\r\n".encode(
                "latin-1"
            ),
            ["250 HELP", Reply.NOT_UTF8_ADDRESS, Reply.NOT_UTF8_ADDRESS],
        ),
        (
            {},
            b"EHLO x\r\n\x1b[2J\x00\r\n",
            ["250 HELP", '500 5.5.1 Error: command "?[2J?" not recognized'],
        ),
        ({}, b"EHLO x\r\nVRFY x\r\n", ["250 HELP", "530 5.7.0 Authentication required"]),
        (
            {"require_tls": True},
            b"EHLO x\r\nAUTH PLAIN\r\n",
            ["250 HELP", "538 5.7.11 Encryption required for requested authentication mechanism"],
        ),
    ],
)
async def test_each_refusal_in_its_words(
    relay: Harness, changes: dict[str, Any], wire: bytes, replies: list[str]
) -> None:
    """The replies the session gives of its own, each with its RFC 3463 code; nothing of
    the client's is echoed that is not printable ASCII."""
    session, transport = session_on(relay, **changes)
    session.data_received(wire)
    got = await transport.replies(len(replies))
    assert [line[: len(want)] for line, want in zip(got, replies, strict=True)] == replies
    transport.close()


async def test_a_client_sending_unknown_commands_is_sent_away(relay: Harness) -> None:
    session, transport = session_on(relay)
    session.data_received(b"BOGUS\r\n" * 5)
    got = await transport.replies(5)
    assert got[:4] == ['500 5.5.1 Error: command "BOGUS" not recognized'] * 4
    assert got[4] == "502 5.5.1 Too many unrecognized commands, goodbye."
    assert transport.closed
