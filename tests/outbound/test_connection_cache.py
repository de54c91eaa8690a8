"""Kept upstream connections and PIPELINING, against a real aiosmtpd receiver that records
every connection, every command and whether the client had sent the rest of the transaction
before MAIL was answered (the bytes already waiting in the server's reader).

The guarantees under test: a copy is never sent twice because a kept connection broke (only
a failure before the upstream answered is tried again, once, on a new connection: before 354
to DATA, before MAIL's reply when a small copy's BDAT chunk went with it); per-recipient
replies stay what they are without PIPELINING; a 421 ends the connection; shutdown says QUIT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.outbound.upstream import KEPT, Outcome, SmtpUpstream
from tests.conftest import StartRelay, make_message
from tests.support import Sink

SENDER = "agent@broker.example"
DATA = b"From: agent@broker.example\r\nSubject: x\r\n\r\n.leading dot\r\nbody\r\n"


@dataclass
class RecordingSink(Sink):
    """A sink that counts connections, records commands per connection, and can break."""

    pipelining: bool = True  # offered in EHLO
    sessions: list[list[str]] = field(default_factory=list)  # the verbs, per connection
    pipelined: list[bool] = field(default_factory=list)  # per MAIL: DATA (BDAT) already sent
    quits: int = 0
    mails: int = 0
    cut_at_mail: set[int] = field(default_factory=set)  # the Nth MAIL: connection cut
    closing_at_mail: set[int] = field(default_factory=set)  # the Nth MAIL: 421, then closed
    cut_after_data: set[int] = field(default_factory=set)  # the Nth message: kept, no reply
    servers: list[SMTP] = field(default_factory=list)  # one per connection
    _seen: dict[int, list[str]] = field(default_factory=dict)

    @property
    def connections(self) -> int:
        return len(self.sessions)

    def _verb(self, session: Session, verb: str) -> None:
        if id(session) not in self._seen:
            self._seen[id(session)] = []
            self.sessions.append(self._seen[id(session)])
        self._seen[id(session)].append(verb)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        if id(session) not in self._seen:
            self.servers.append(server)
        self._verb(session, f"EHLO {hostname}")
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._verb(session, "MAIL")
        self.mails += 1
        waiting = bytes(server._reader._buffer)
        self.pipelined.append(b"DATA\r\n" in waiting or b"\r\nBDAT " in waiting)
        assert server.transport is not None
        if self.mails in self.cut_at_mail:
            server.transport.abort()
            return "250 OK"  # never heard
        if self.mails in self.closing_at_mail:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.3.2 shutting down"
        envelope.mail_from, envelope.mail_options = address, list(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._verb(session, "RCPT")
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._verb(session, "RSET")
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._verb(session, "DATA")
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) in self.cut_after_data:
            assert server.transport is not None
            server.transport.abort()
        return reply

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._verb(session, "QUIT")
        async with self._changed:
            self.quits += 1
            self._changed.notify_all()
        return "221 Bye"

    async def wait_for(self, done: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(done)


@pytest.fixture
async def sink() -> AsyncIterator[RecordingSink]:
    server = await RecordingSink().start()
    yield server
    await server.stop()


async def send(upstream: SmtpUpstream, *recipients: str) -> dict[str, Outcome]:
    return await upstream.send(SENDER, list(recipients or ["p@example.com"]), DATA)


def delivered(outcomes: dict[str, Outcome]) -> bool:
    return all(outcome.delivered for outcome in outcomes.values())


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_copies_share_one_connection_and_are_pipelined(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream], chunking: bool
) -> None:
    sink.chunking = chunking
    upstream = upstreams()
    for number in range(5):
        assert delivered(await send(upstream, f"p{number}@example.com"))
    assert sink.connections == 1
    assert sink.sessions[0][0] == "EHLO relay.broker.example"  # local_hostname, not the FQDN
    # a transaction ended by the reply to its data needs no RSET before the next MAIL
    assert sink.sessions[0][1:7] == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"]
    assert "RSET" not in sink.sessions[0]
    assert sink.pipelined == [True] * 5  # RCPT and DATA left before MAIL was answered
    assert [m.rcpt_tos for m in sink.messages] == [[f"p{n}@example.com"] for n in range(5)]
    assert all(m.data == DATA for m in sink.messages)  # the leading dot came back whole
    assert upstream.connections.idle(KEPT) == 1


async def test_a_server_without_pipelining_gets_one_command_at_a_time(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    sink.pipelining = False
    sink.refuse["gone@example.com"] = "550 5.1.1 no such user"
    upstream = upstreams()
    outcomes = await send(upstream, "p@example.com", "gone@example.com")
    assert outcomes["p@example.com"].delivered
    assert outcomes["gone@example.com"].error == "550 5.1.1 no such user"
    assert outcomes["gone@example.com"].permanent
    only_gone = await send(upstream, "gone@example.com")  # no DATA for nobody, so RSET next
    assert only_gone["gone@example.com"].permanent
    assert delivered(await send(upstream, "q@example.com"))
    assert sink.connections == 1 and sink.pipelined == [False] * 3
    assert sink.sessions[0][1:] == [
        *("MAIL", "RCPT", "RCPT", "DATA"),
        *("MAIL", "RCPT"),
        *("RSET", "MAIL", "RCPT", "DATA"),
    ]
    assert [m.rcpt_tos for m in sink.messages] == [["p@example.com"], ["q@example.com"]]


async def test_pipelining_can_be_turned_off(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams(pipelining=False)
    assert delivered(await send(upstream))
    assert sink.pipelined == [False]


async def test_partial_refusals_with_pipelining_keep_their_replies(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    sink.refuse["gone@example.com"] = "550 5.1.1 no such user"
    sink.refuse["later@example.com"] = "451 4.3.0 try again later"
    upstream = upstreams()
    outcomes = await send(upstream, "p@example.com", "gone@example.com", "later@example.com")
    assert outcomes["p@example.com"].delivered
    assert outcomes["p@example.com"].reply == "250 OK stored"
    assert outcomes["p@example.com"].remote_mta == "127.0.0.1"
    gone, later = outcomes["gone@example.com"], outcomes["later@example.com"]
    assert (gone.error, gone.permanent) == ("550 5.1.1 no such user", True)
    assert (later.error, later.permanent) == ("451 4.3.0 try again later", False)
    # all refused: the pipelined DATA is refused too, nothing is sent, the connection stays
    none = await send(upstream, "gone@example.com", "later@example.com")
    assert none["gone@example.com"].permanent and not none["later@example.com"].permanent
    assert delivered(await send(upstream, "q@example.com"))
    assert sink.connections == 1
    assert [m.rcpt_tos for m in sink.messages] == [["p@example.com"], ["q@example.com"]]


async def test_a_connection_carries_at_most_the_reuse_count(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams(connection_reuse_count_limit=2)
    for _ in range(5):
        assert delivered(await send(upstream))
    assert sink.connections == 3
    await sink.wait_for(lambda: sink.quits == 2)  # the two used up said goodbye
    assert [len([v for v in s if v == "MAIL"]) for s in sink.sessions] == [2, 2, 1]


async def test_a_connection_is_not_reused_after_its_time_limit(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams(connection_reuse_time_limit=0.3)
    assert delivered(await send(upstream))
    assert delivered(await send(upstream))
    assert sink.connections == 1
    await asyncio.sleep(0.35)  # the limit is a time: nothing to wait for but the clock
    assert delivered(await send(upstream))
    assert sink.connections == 2
    await sink.wait_for(lambda: sink.quits == 1)


async def test_an_idle_connection_is_closed_with_quit_after_its_idle_limit(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams(connection_cache_time_limit=0.2)
    assert delivered(await send(upstream))
    await sink.wait_for(lambda: sink.quits == 1)
    assert upstream.connections.idle(KEPT) == 0
    assert delivered(await send(upstream))
    assert sink.connections == 2


async def test_a_connection_used_again_gets_its_idle_limit_from_its_last_copy(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """The cache's one timer comes due at the first copy's limit; the connection, taken and
    kept again since, is not the one that expired then."""
    upstream = upstreams(connection_cache_time_limit=1.2)
    assert delivered(await send(upstream))
    await asyncio.sleep(0.6)
    assert delivered(await send(upstream))
    await asyncio.sleep(0.8)  # past the first copy's limit, 0.4 s before the second's
    assert (sink.quits, upstream.connections.idle(KEPT)) == (0, 1)
    await sink.wait_for(lambda: sink.quits == 1)
    assert upstream.connections.idle(KEPT) == 0
    assert sink.connections == 1


async def test_no_cache_means_a_connection_per_copy(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams(connection_cache=0)
    for _ in range(3):
        assert delivered(await send(upstream))
    assert sink.connections == 3
    await sink.wait_for(lambda: sink.quits == 3)


async def test_unset_the_cache_keeps_every_connection_a_burst_opened(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """Left unset, the cache keeps what a destination's concurrent sends opened (the worker
    bounds them by destination_concurrency), so the next burst opens none; a set size
    still caps it."""
    unset, four = upstreams(), upstreams(connection_cache=4)
    held = 0

    async def burst(upstream: SmtpUpstream) -> None:
        nonlocal held
        release = sink.hold = asyncio.Event()
        sends = [asyncio.create_task(send(upstream, f"p{n}@example.com")) for n in range(6)]
        held += 6
        await sink.wait_held(held, 10)
        release.set()
        assert all(delivered(outcomes) for outcomes in await asyncio.gather(*sends))

    await burst(unset)
    assert (sink.connections, unset.connections.idle(KEPT)) == (6, 6)
    await burst(unset)
    assert (sink.connections, unset.connections.idle(KEPT)) == (6, 6)
    await burst(four)
    assert (sink.connections, four.connections.idle(KEPT)) == (12, 4)


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_a_kept_connection_that_broke_before_data_is_retried_once_on_a_new_one(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream], chunking: bool
) -> None:
    sink.chunking = chunking
    upstream = upstreams()
    sink.cut_at_mail = {2}
    assert delivered(await send(upstream, "a@example.com"))
    assert delivered(await send(upstream, "b@example.com"))  # cut at MAIL, then a new one
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.com"], ["b@example.com"]]
    sink.cut_at_mail = {4, 5}  # the kept one, and the new one too: only one retry
    [outcome] = (await send(upstream, "c@example.com")).values()
    assert not outcome.delivered and not outcome.permanent
    assert "127.0.0.1:" in (outcome.error or "")
    assert sink.connections == 3 and sink.mails == 5
    assert len(sink.messages) == 2


async def test_an_idle_connection_the_upstream_ended_is_replaced(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams()
    assert delivered(await send(upstream, "a@example.com"))
    transport = sink.servers[0].transport
    assert transport is not None
    transport.write(b"421 4.4.2 sink.test idle too long\r\n")  # as Postfix's smtpd does
    transport.close()
    assert delivered(await send(upstream, "b@example.com"))
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.com"], ["b@example.com"]]


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_a_connection_lost_after_the_data_is_never_sent_again(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream], chunking: bool
) -> None:
    sink.chunking = chunking
    upstream = upstreams()
    sink.cut_after_data = {2}
    assert delivered(await send(upstream, "a@example.com"))
    [outcome] = (await send(upstream, "b@example.com")).values()
    assert not outcome.delivered and not outcome.permanent  # deferred: it may have arrived
    assert len(sink.messages) == 2 and sink.connections == 1  # stored once, not retried
    assert delivered(await send(upstream, "c@example.com"))  # a new connection
    assert sink.connections == 2


async def test_421_mid_session_defers_and_ends_the_connection(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams()
    sink.closing_at_mail = {1}
    outcomes = await send(upstream, "a@example.com", "b@example.com")
    for outcome in outcomes.values():
        assert (outcome.error, outcome.permanent) == ("421 4.3.2 shutting down", False)
    assert upstream.connections.idle(KEPT) == 0  # never kept after a 421
    assert delivered(await send(upstream, "a@example.com"))
    sink.closing_at_mail = {3}  # a kept connection's 421 before the data: a new one
    assert delivered(await send(upstream, "b@example.com"))
    assert sink.connections == 3
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.com"], ["b@example.com"]]


async def test_close_says_quit_on_kept_connections(
    sink: RecordingSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams()
    busy = upstreams()
    await asyncio.gather(send(upstream), send(upstream), send(busy))
    assert upstream.connections.idle(KEPT) == 2  # both kept: two copies at the same time
    await upstream.close()
    assert sink.quits == 2  # answered before close() returned
    assert delivered(await send(upstream))  # a closed cache keeps nothing more
    await sink.wait_for(lambda: sink.quits == 3)
    assert upstream.connections.idle(KEPT) == 0


async def test_the_relay_sends_over_one_connection_and_says_quit_when_it_stops(
    relay_factory: StartRelay, sink: RecordingSink
) -> None:
    relay = await relay_factory()
    for number in range(3):
        await relay.send(make_message(to=f"p{number}@example.com"))
        await sink.expect(number + 1)
    assert sink.connections == 1
    assert sink.sessions[0][0] == "EHLO relay.broker.example"  # [server] hostname
    await relay.relay.stop()
    assert sink.quits == 1  # before stop() returned
