"""The milter protocol at the packet level: negotiation, macros, each stage, the replies,
and peers that misbehave (a disconnect mid-message, garbled or oversized packets, unknown
commands). The filter here only records what it was given."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from gateway.fronts import milter_protocol as mp
from tests.fronts.milter_client import MilterClient, packet, strings


class Recorder:
    """A filter that records each call; `eom` is what it answers at the end."""

    def __init__(self, log: list[tuple[str, object]], eom: list[mp.Reply]) -> None:
        self.log = log
        self.eom = eom
        self.macros: dict[str, str] = {}

    async def connect(self, info: mp.Connect) -> mp.Reply:
        self.log.append(("connect", info))
        return mp.CONTINUE

    async def helo(self, name: str) -> mp.Reply:
        self.log.append(("helo", name))
        return mp.CONTINUE

    async def mail(self, args: list[str]) -> mp.Reply:
        self.log.append(("mail", (args, dict(self.macros))))
        if args[0] == "<refused@example.com>":
            return mp.reply_code("550 5.7.1 Not you, 100% sure")
        return mp.CONTINUE

    async def rcpt(self, args: list[str]) -> mp.Reply:
        self.log.append(("rcpt", args))
        return mp.CONTINUE

    async def header(self, name: str, value: bytes) -> mp.Reply:
        self.log.append(("header", (name, value)))
        return mp.CONTINUE

    async def end_of_headers(self) -> mp.Reply:
        self.log.append(("eoh", None))
        return mp.CONTINUE

    async def body(self, chunk: bytes) -> mp.Reply:
        self.log.append(("body", chunk))
        return mp.CONTINUE

    async def end_of_message(self) -> list[mp.Reply]:
        self.log.append(("eom", dict(self.macros)))
        return self.eom

    def abort(self) -> None:
        self.log.append(("abort", None))


class Server:
    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.eom: list[mp.Reply] = [mp.CONTINUE]
        self.finished = asyncio.Event()
        self.port = 0

    async def start(self) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connection = mp.MilterConnection(
                reader, writer, lambda: Recorder(self.log, self.eom), timeout=5
            )
            await connection.run()
            self.finished.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def ended(self) -> None:
        async with asyncio.timeout(10):
            await self.finished.wait()

    def calls(self, name: str) -> list[object]:
        return [value for call, value in self.log if call == name]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listener = await state.start()
    yield state
    listener.close()
    await listener.wait_closed()


async def test_negotiation_asks_only_for_what_the_front_needs(server: Server) -> None:
    client = await MilterClient.open(server.port)
    version, actions, steps, macros = await client.negotiate()
    assert version == 6
    assert actions == mp.ADD_HEADERS | mp.CHANGE_HEADERS | mp.SET_SYMBOL_LIST
    assert steps == mp.NO_UNKNOWN | mp.NO_DATA | mp.HEADER_LEADING_SPACE
    assert macros == (
        struct.pack("!I", 2) + b"{auth_authen} {auth_type}\0" + struct.pack("!I", 5) + b"i\0"
    )
    await client.close()


async def test_negotiation_never_asks_for_what_the_mta_does_not_offer(server: Server) -> None:
    client = await MilterClient.open(server.port)
    version, actions, steps, macros = await client.negotiate(actions=0x01, steps=0x200)
    assert (version, actions, steps, macros) == (6, 0x01, 0x200, b"")
    await client.close()


async def test_a_whole_message_reaches_the_filter_and_gets_its_replies(server: Server) -> None:
    server.eom = [mp.add_header("X-Sealrelay", "abc checked"), mp.delete_header("X-A", 2)]
    server.eom.append(mp.CONTINUE)
    client = await MilterClient.open(server.port)
    await client.start(helo="mx.example", address="2001:db8::1")
    answers = await client.envelope("a@broker.example", ["p@example.com"], login="a@b.example")
    assert [a.code for a in answers] == [b"c"]
    raw = b"Subject: Hi\r\nTo: p@example.com,\r\n q@example.com\r\n\r\nbody\r\n"
    answers = await client.content(raw, queue_id="4QX")
    assert [(a.code, a.data) for a in answers] == [
        (b"h", b"X-Sealrelay\0 abc checked\0"),  # values are taken as given: the space
        (b"m", struct.pack("!I", 2) + b"X-A\0\0"),
        (b"c", b""),
    ]
    assert server.calls("connect") == [mp.Connect("client.example", "4", 40000, "2001:db8::1")]
    assert server.calls("helo") == ["mx.example"]
    assert server.calls("mail") == [(["<a@broker.example>"], {"auth_authen": "a@b.example"})]
    assert server.calls("header") == [
        ("Subject", b" Hi"),
        ("To", b" p@example.com,\n q@example.com"),
    ]
    assert server.calls("body") == [b"body\r\n"]
    assert server.calls("eom") == [{"auth_authen": "a@b.example", "i": "4QX"}]
    await client.tell(mp.QUIT)
    assert await client.closed_by_peer()


async def test_the_next_message_does_not_inherit_the_last_ones_login(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.start()
    await client.envelope("a@broker.example", ["p@example.com"], login="a@b.example")
    await client.tell(mp.ABORT)
    await client.tell(mp.MACRO, b"M")  # Postfix sends the stage's macros, here none
    assert (await client.ask(mp.MAIL, strings("<b@broker.example>")))[-1].code == b"c"
    assert server.calls("mail")[-1] == (["<b@broker.example>"], {})
    assert server.calls("abort") == [None]
    await client.close()


async def test_a_refusal_carries_its_reply_text(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.start()
    answers = await client.envelope("refused@example.com", ["p@example.com"])
    assert [(a.code, a.text) for a in answers] == [(b"y", "550 5.7.1 Not you, 100%% sure")]
    await client.close()


async def test_reply_codes_must_be_smtp_refusals() -> None:
    for text in ("250 2.0.0 fine", "hello", "55 short"):
        with pytest.raises(ValueError):
            mp.reply_code(text)
    assert mp.reply_code("451 4.3.0 two\r\nlines").data == b"451 4.3.0 two lines\0"
    quoting = mp.reply_code("553 5.7.1 You may not send as b\x00\xf6ss@x.example")
    assert quoting.data == b"553 5.7.1 You may not send as b??ss@x.example\0"
    assert mp.TEMPFAIL.packet() == b"\0\0\0\x01t"
    assert mp.DISCARD.packet() == b"\0\0\0\x01d"


async def test_a_peer_that_disconnects_mid_message_aborts_it(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.start()
    await client.envelope("a@broker.example", ["p@example.com"])
    assert (await client.ask(mp.HEADER, b"Subject\0 Hi\0"))[-1].code == b"c"
    client.writer.write(packet(mp.BODY, b"half a body")[:9])  # cut inside a packet
    await client.close()
    await server.ended()
    assert server.calls("eom") == []
    assert server.log[-1] == ("abort", None)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!I", mp.MAX_PACKET + 1) + b"B",  # oversized
        struct.pack("!I", 0),  # a packet with no command
        packet(b"Z", b"what"),  # an unknown command
        packet(mp.HEADER, b"no terminator"),  # garbled
        packet(mp.MAIL, b"<a@b.example>"),  # a string without its NUL
        packet(mp.MACRO),  # a macro packet without its stage
        packet(mp.MACRO, b"Mname\0"),  # a macro without a value
        packet(mp.CONNECT, b"host\0" + b"4\0"),  # an address cut short
    ],
    ids=["oversized", "empty", "unknown", "header", "string", "macro", "macro-value", "connect"],
)
async def test_a_broken_packet_closes_the_connection_without_an_answer(
    server: Server, data: bytes
) -> None:
    client = await MilterClient.open(server.port)
    await client.negotiate()
    await client.envelope("a@broker.example", [])
    client.writer.write(data)
    assert await client.closed_by_peer()
    await server.ended()
    assert server.calls("eom") == []
    assert server.log[-1] == ("abort", None)


async def test_commands_before_negotiation_are_refused(server: Server) -> None:
    client = await MilterClient.open(server.port)
    client.writer.write(packet(mp.HELO, strings("x")))
    assert await client.closed_by_peer()
    assert server.calls("helo") == []


async def test_data_and_unknown_commands_just_continue(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.negotiate()
    assert [a.code for a in await client.ask(mp.DATA)] == [b"c"]
    assert [a.code for a in await client.ask(mp.UNKNOWN, strings("XYZZY"))] == [b"c"]
    await client.close()


async def test_a_silent_mta_is_cut_off() -> None:
    finished = asyncio.Event()
    log: list[tuple[str, object]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await mp.MilterConnection(reader, writer, lambda: Recorder(log, []), timeout=0.2).run()
        finished.set()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = await MilterClient.open(listener.sockets[0].getsockname()[1])
    await client.negotiate()
    assert await client.closed_by_peer()
    async with asyncio.timeout(10):
        await finished.wait()
    assert log == [("abort", None)]
    listener.close()
    await listener.wait_closed()


async def test_values_lose_no_leading_space_when_the_mta_strips_it(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.negotiate(steps=0)  # an MTA that cannot keep the space
    await client.ask(mp.HEADER, b"Subject\0Hi\0")
    assert server.calls("header") == [("Subject", b" Hi")]
    await client.close()


async def test_added_values_get_no_extra_space_when_the_mta_adds_it(server: Server) -> None:
    server.eom = [mp.add_header("X-Sealrelay", "abc"), mp.CONTINUE]
    client = await MilterClient.open(server.port)
    await client.negotiate(steps=0)
    answers = await client.ask(mp.BODYEOB)
    assert [(a.code, a.data) for a in answers] == [(b"h", b"X-Sealrelay\0abc\0"), (b"c", b"")]
    await client.close()


async def test_a_reused_connection_starts_a_new_session(server: Server) -> None:
    client = await MilterClient.open(server.port)
    await client.start(helo="first.example")
    await client.envelope("a@broker.example", ["p@example.com"], login="a@b.example")
    await client.tell(mp.QUIT_NC)
    await client.tell(mp.MACRO, b"C" + strings("j", "mx.example"))
    await client.start(helo="second.example")
    await client.tell(mp.MACRO, b"M")
    assert (await client.ask(mp.MAIL, strings("<b@broker.example>")))[-1].code == b"c"
    assert server.calls("helo") == ["first.example", "second.example"]
    assert server.calls("mail")[-1] == (["<b@broker.example>"], {"j": "mx.example"})
    assert server.calls("abort") == [None]
    await client.close()
