"""CHUNKING (RFC 3030) upstream: a copy leaves as one `BDAT <size> LAST` chunk when the
upstream offers it, as Microsoft 365, Gmail and Postfix's smtpd do.

Against a real aiosmtpd receiver taught BDAT (tests/chunking_smtp.py) that records the
octets it read per connection: what arrives is the copy byte for byte, with no dot doubled
and the size said in BDAT exact; refusals keep their replies; a small copy's chunk leaves
with its envelope, a big one only for somebody; a copy whose blob changes on the way is cut
before its chunk is whole, so nothing arrives.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway.mail.dkim import body_hash
from gateway.mail.headers import split_offsets
from gateway.mail.outgoing import Signer
from gateway.outbound.smtp_connection import PIECE, SourceFailed
from gateway.outbound.stored_copy import BlobChanged
from gateway.outbound.upstream import Outcome, SmtpUpstream
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Message
from tests.conftest import StartRelay, dkim_dns, make_message
from tests.outbound.test_stored_copy import big_message, stored_copy
from tests.support import CountingSMTP, Sink

SENDER = "agent@broker.example"
DATA = b"From: agent@broker.example\r\nSubject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
BIG = DATA + b"x" * PIECE + b"\r\n"  # too big to leave before the envelope is answered


class _WireSMTP(CountingSMTP):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        assert isinstance(sink, WireSink)
        self.sink = sink
        self.wire = bytearray()
        sink.wires.append(self.wire)

    def data_received(self, data: bytes) -> None:
        self.wire += data
        super().data_received(data)

    async def smtp_MAIL(self, arg: str) -> None:
        # what the client wrote before it heard MAIL's reply is in the reader already
        self.sink.chunk_before_mail_reply.append(b"\r\nBDAT " in bytes(self._reader._buffer))
        await super().smtp_MAIL(arg)


@dataclass
class WireSink(Sink):
    """A sink offering PIPELINING and CHUNKING that keeps each connection's octets."""

    pipelining: bool = True
    chunking: bool = True
    wires: list[bytearray] = field(default_factory=list)
    chunk_before_mail_reply: list[bool] = field(default_factory=list)  # per MAIL
    protocol: ClassVar[type[CountingSMTP]] = _WireSMTP

    def verbs(self) -> list[str]:
        """The commands each connection sent, in order (chunks' octets left out)."""
        said: list[str] = []
        for wire in self.wires:
            rest = bytes(wire)
            while rest:
                line, _, rest = rest.partition(b"\r\n")
                verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
                said.append(verb)
                if verb == "BDAT":
                    rest = rest[int(line.split()[1]) :]
                elif verb == "DATA":
                    rest = rest.partition(b"\r\n.\r\n")[2]
        return said


@pytest.fixture
async def sink() -> AsyncIterator[WireSink]:
    server = await WireSink().start()
    yield server
    await server.stop()


async def send(upstream: SmtpUpstream, *recipients: str, data: Any = DATA) -> dict[str, Outcome]:
    return await upstream.send(SENDER, list(recipients or ["p@example.com"]), data)


def bdat_sizes(sink: WireSink) -> list[int]:
    return [int(size) for size in re.findall(rb"BDAT (\d+) LAST\r\n", b"".join(sink.wires))]


async def test_copies_leave_as_one_chunk_each_with_no_dot_doubled(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    upstream = upstreams()
    for number in range(3):
        outcomes = await send(upstream, f"p{number}@example.com")
        assert all(outcome.delivered for outcome in outcomes.values())
    assert [m.chunks for m in sink.messages] == [1, 1, 1]
    assert all(m.data == DATA for m in sink.messages)
    wire = b"".join(sink.wires)
    assert b"...two" not in wire and b"\r\n..leading" not in wire  # nothing was stuffed
    assert bdat_sizes(sink) == [len(DATA)] * 3
    assert sink.verbs() == ["EHLO", *["MAIL", "RCPT", "BDAT"] * 3]  # no DATA, no RSET


async def test_a_copy_without_a_final_crlf_gets_one_counted_in_the_chunk(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    data = DATA + b"letzte Zeile"
    assert all(o.delivered for o in (await send(upstreams(), data=data)).values())
    assert sink.messages[0].data == data + b"\r\n"
    assert bdat_sizes(sink) == [len(data) + 2]


async def test_a_small_chunk_for_nobody_is_refused_and_the_next_transaction_resets(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """A small copy's chunk leaves with its envelope (one round trip): with every recipient
    refused, the upstream reads it, refuses it and keeps nothing."""
    sink.refuse["gone@example.com"] = "550 5.1.1 no such user"
    sink.refuse["later@example.com"] = "451 4.3.0 try again later"
    upstream = upstreams()
    nobody = await send(upstream, "gone@example.com", "later@example.com")
    assert nobody["gone@example.com"].permanent
    assert nobody["later@example.com"].error == "451 4.3.0 try again later"
    assert not nobody["later@example.com"].permanent
    some = await send(upstream, "p@example.com", "gone@example.com")
    assert some["p@example.com"].delivered and some["gone@example.com"].permanent
    transaction = ["MAIL", "RCPT", "RCPT", "BDAT"]
    assert sink.verbs() == ["EHLO", *transaction, "RSET", *transaction]
    assert [m.rcpt_tos for m in sink.messages] == [["p@example.com"]]
    assert len(sink.wires) == 1


@pytest.mark.parametrize("data, pipelining", [(BIG, True), (DATA, False)], ids=["big", "small"])
async def test_a_big_chunk_or_an_unpipelined_one_never_leaves_for_nobody(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream], data: bytes, pipelining: bool
) -> None:
    """A big copy waits for the envelope's replies: megabytes do not leave for nobody. Nor
    does any chunk where the upstream answers one command at a time."""
    sink.pipelining = pipelining
    sink.refuse["gone@example.com"] = "550 5.1.1 no such user"
    upstream = upstreams()
    [refused] = (await send(upstream, "gone@example.com", data=data)).values()
    assert refused.permanent
    [taken] = (await send(upstream, data=data)).values()
    assert taken.delivered
    assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "BDAT"]
    assert [m.data for m in sink.messages] == [data]


async def test_a_big_chunk_waits_for_the_envelopes_replies(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """What the sink had read when MAIL came: the chunk of a small copy, none of a big one."""
    upstream = upstreams()
    for data in (DATA, BIG, DATA):
        assert all(o.delivered for o in (await send(upstream, data=data)).values())
    assert sink.chunk_before_mail_reply == [True, False, True]
    assert [m.data for m in sink.messages] == [DATA, BIG, DATA]


async def test_a_refused_chunk_is_the_copys_reply_and_the_next_transaction_resets(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    sink.data_reply = "554 5.7.1 message content rejected"
    upstream = upstreams()
    [refused] = (await send(upstream)).values()
    assert refused.permanent and refused.error == "554 5.7.1 message content rejected"
    sink.data_reply = None
    [taken] = (await send(upstream)).values()
    assert taken.delivered
    assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT"]
    assert len(sink.wires) == 1 and len(sink.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_chunking_can_be_turned_off_and_is_used_without_pipelining(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream], pipelining: bool
) -> None:
    sink.pipelining = pipelining
    await send(upstreams(chunking=False))
    await send(upstreams())
    assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "EHLO", "MAIL", "RCPT", "BDAT"]
    assert [m.chunks for m in sink.messages] == [0, 1]
    assert sink.messages[0].data == sink.messages[1].data == DATA


async def test_a_stored_copy_streams_as_one_chunk_byte_for_byte(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream], tmp_path: Path
) -> None:
    raw = big_message()
    async with stored_copy(LocalBlobStore(tmp_path), raw, Signer({}), 4093) as (copy, whole):
        [outcome] = (await send(upstreams(), data=copy)).values()
    assert outcome.delivered
    [received] = sink.messages
    assert received.data == whole and received.chunks == 1
    assert bdat_sizes(sink) == [len(whole)]


async def test_a_blob_changed_on_the_way_cuts_the_chunk_and_nothing_arrives(
    sink: WireSink, upstreams: Callable[..., SmtpUpstream], tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path)
    raw = big_message()
    async with stored_copy(store, raw, Signer({}), 4093) as (copy, _):
        [path] = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == len(raw)]
        with path.open("r+b") as file:
            file.seek(len(raw) - 100)
            file.write(b"#" if raw[-100:-99] != b"#" else b"+")
        with pytest.raises(SourceFailed) as failed:
            await send(upstreams(), data=copy)
    assert isinstance(failed.value.__cause__, BlobChanged)
    assert sink.messages == []
    assert 0 < len(sink.wires[0]) < len(raw)  # part of the chunk left, then the connection closed


async def test_the_relay_sends_a_big_signed_message_in_one_chunk(
    relay_factory: StartRelay,
) -> None:
    """Through the whole relay: intake, the stored original streamed, DKIM-signed, as BDAT."""
    harness = await relay_factory()
    harness.sink.chunking = True
    body = "Zeile mit Punkt\n.am Anfang\n" * 12_000  # past WHOLE: streamed
    await harness.send(make_message(subject="Exposé groß", body=body))
    [received] = await harness.sink.expect(1)
    assert received.chunks == 1
    assert dkimpy.verify(received.data, dnsfunc=dkim_dns(harness.dkim_key))
    assert b"\r\n.am Anfang\r\n" in received.data and b"\r\n..am Anfang" not in received.data


async def test_the_relay_sends_small_signed_messages_with_their_envelopes(
    relay_factory: StartRelay,
) -> None:
    """Through the whole relay to an upstream offering PIPELINING and CHUNKING: each small
    copy one chunk, sent with its envelope, signed, its dotted lines as they were."""
    harness = await relay_factory()
    harness.sink.pipelining = harness.sink.chunking = True
    for number in range(3):
        await harness.send(make_message(subject=f"Exposé {number}", body=".Punkt\n..zwei\n"))
    received = await harness.sink.expect(3)
    assert [copy.chunks for copy in received] == [1, 1, 1]
    for copy in received:
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(harness.dkim_key))
        assert copy.data.endswith(b"\r\n.Punkt\r\n..zwei\r\n")


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
async def test_the_relay_signs_a_big_original_with_the_body_hash_kept_at_intake(
    relay_factory: StartRelay, database: Database, chunking: bool
) -> None:
    """The intake keeps a big signed original's body hash, and its delivery signs with it
    in one read of the blob: the signature verifies where relaxed canonicalization changes
    the body (runs of spaces, white space at line ends, empty lines at the end)."""
    harness = await relay_factory()
    harness.sink.chunking = chunking
    body = "Zeile  mit   Leerzeichen \t\n\tEingerückt\t \n.Punkt\n" * 8_000 + "\n \n\n"
    message = make_message(subject="Exposé groß", body=body)
    message.replace_header("Content-Transfer-Encoding", "8bit")
    await harness.send(message)
    [received] = await harness.sink.expect(1)
    assert dkimpy.verify(received.data, dnsfunc=dkim_dns(harness.dkim_key))
    assert b"Zeile  mit   Leerzeichen \t\r\n\tEinger\xc3\xbcckt" in received.data
    async with database.transaction() as session:
        [row] = (await session.scalars(select(Message))).all()
    raw = await harness.relay.blobs.read(row.blob)
    assert row.body_hash is not None
    assert row.body_hash == body_hash(raw, split_offsets(raw)[1])


async def test_a_big_original_that_does_not_leave_as_received_keeps_no_body_hash(
    relay_factory: StartRelay, database: Database
) -> None:
    """An instruction to the relay (X-Sealrelay-*) is taken out of every copy: what leaves
    is another blob, hashed as it is read, so the intake spends nothing on the original's."""
    harness = await relay_factory()
    message = make_message(subject="Exposé groß", body="Zeile  mit Leerzeichen\n" * 20_000)
    message["X-Sealrelay-Language"] = "de"
    await harness.send(message)
    [received] = await harness.sink.expect(1)
    assert dkimpy.verify(received.data, dnsfunc=dkim_dns(harness.dkim_key))
    assert b"X-Sealrelay-Language" not in received.data
    async with database.transaction() as session:
        [row] = (await session.scalars(select(Message))).all()
    assert row.size > 256 * 1024 and row.body_hash is None
