"""An upstream's replies as the kept connection reads them (gateway/outbound/smtp_connection.py):
one-line and multi-line replies, whole or a byte at a time, and what is no reply at all.

A scripted server on loopback answers the first thing it reads with fixed bytes; the
connection writes MAIL, RCPT and DATA pipelined and reads them back in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.outbound.smtp_connection import (
    MAX_LINE,
    ConnectionEnded,
    Replies,
    SmtpConnection,
)

COPY = b"From: agent@broker.example\r\nSubject: x\r\n\r\nhello\r\n"


@asynccontextmanager
async def upstream_saying(script: bytes, *, byte_by_byte: bool) -> AsyncIterator[SmtpConnection]:
    """A connection to a server that answers what it first reads with `script`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"DATA\r\n")
        for start in range(0, len(script), 1 if byte_by_byte else len(script)):
            writer.write(script[start : start + (1 if byte_by_byte else len(script))])
            await writer.drain()
        await reader.read()  # until the relay closes
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, "127.0.0.1", port
    )
    connection = SmtpConnection(
        transport,
        {"pipelining"},
        remote="upstream.test",
        where=f"127.0.0.1:{port}",
        pipelining=True,
        chunking=False,
    )
    try:
        yield connection
    finally:
        connection.close()
        server.close()
        await server.wait_closed()


async def send(script: bytes, *, byte_by_byte: bool = False) -> Replies:
    async with upstream_saying(script, byte_by_byte=byte_by_byte) as connection:
        return await connection.send(
            "agent@broker.example", ["prospect@home.example"], COPY, reply_timeout=5
        )


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "a byte at a time"])
async def test_each_reply_is_read_in_order_with_its_lines_joined(byte_by_byte: bool) -> None:
    replies = await send(
        b"250-2.1.0 first line\r\n250 2.1.0 second line  \r\n"
        b"250 2.1.5 Ok\r\n"
        b"554 5.3.0 no data today\r\n",
        byte_by_byte=byte_by_byte,
    )
    assert (replies.mail.code, replies.mail.message) == (250, "2.1.0 first line\n2.1.0 second line")
    assert [(r.code, r.message) for r in replies.rcpt] == [(250, "2.1.5 Ok")]
    assert replies.data is not None
    assert (replies.data.code, replies.data.text) == (554, "554 5.3.0 no data today")


async def test_a_reply_line_of_code_alone_has_an_empty_text() -> None:
    replies = await send(b"250\r\n250 \r\n554\r\n")
    assert (replies.mail.code, replies.mail.message) == (250, "")
    assert replies.rcpt[0].message == ""
    assert replies.data is not None and replies.data.code == 554


@pytest.mark.parametrize(
    ("script", "said"),
    [
        (b"hello there\r\n", "the upstream sent no SMTP reply: b'hello there\\r\\n'"),
        (b"25x Ok\r\n", "the upstream sent no SMTP reply: b'25x Ok\\r\\n'"),
        (b"250:Ok\r\n", "the upstream sent no SMTP reply: b'250:Ok\\r\\n'"),
        (b"250 " + b"x" * MAX_LINE + b"\r\n", "the upstream sent no SMTP reply: b'250 xxx"),
        (b"250 " + b"x" * (MAX_LINE + 10), "the upstream sent a reply line too long"),
        (b"".join(b"250-" + b"x" * 8000 + b"\r\n" for _ in range(5)), "a reply too long"),
    ],
    ids=["words", "no code", "no separator", "a line too long", "no line end", "too long"],
)
async def test_what_is_no_reply_ends_the_conversation_before_the_data(
    script: bytes, said: str
) -> None:
    with pytest.raises(ConnectionEnded) as ended:
        await send(script)
    assert ended.value.before_data
    assert said in str(ended.value)
    assert str(ended.value).startswith("127.0.0.1:")
