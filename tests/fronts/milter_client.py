"""The MTA's side of the milter protocol, for tests: what Postfix sends, packet by packet."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass

from gateway.fronts import milter_protocol as mp

TIMEOUT = 15.0
FINAL = frozenset(b"cadrty")
# what Postfix 3.7 offers: every action, every step flag it knows
POSTFIX_ACTIONS = 0x1FF
POSTFIX_STEPS = 0x1FFFFF


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def strings(*values: str) -> bytes:
    return b"".join(v.encode() + b"\0" for v in values)


@dataclass
class Answer:
    code: bytes
    data: bytes

    @property
    def text(self) -> str:
        return self.data.rstrip(b"\0").decode()


class MilterClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> MilterClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(reader, writer)

    async def read(self) -> Answer:
        async with asyncio.timeout(TIMEOUT):
            (length,) = struct.unpack("!I", await self.reader.readexactly(4))
            data = await self.reader.readexactly(length)
        return Answer(data[:1], data[1:])

    async def ask(self, command: bytes, data: bytes = b"") -> list[Answer]:
        """Send one command; its answers up to and including the final one."""
        self.writer.write(packet(command, data))
        await self.writer.drain()
        answers = [await self.read()]
        while answers[-1].code[0] not in FINAL and answers[-1].code != mp.OPTNEG:
            answers.append(await self.read())
        return answers

    async def tell(self, command: bytes, data: bytes = b"") -> None:
        """Send a command that gets no answer (macros, abort, quit)."""
        self.writer.write(packet(command, data))
        await self.writer.drain()

    async def negotiate(
        self, actions: int = POSTFIX_ACTIONS, steps: int = POSTFIX_STEPS
    ) -> tuple[int, int, int, bytes]:
        (answer,) = await self.ask(mp.OPTNEG, struct.pack("!III", 6, actions, steps))
        assert answer.code == mp.OPTNEG
        version, got_actions, got_steps = struct.unpack("!III", answer.data[:12])
        return version, got_actions, got_steps, answer.data[12:]

    async def start(self, *, helo: str = "client.example", address: str = "192.0.2.7") -> None:
        await self.negotiate()
        connect = b"client.example\0" + b"4" + struct.pack("!H", 40000) + address.encode() + b"\0"
        assert (await self.ask(mp.CONNECT, connect))[-1].code == b"c"
        assert (await self.ask(mp.HELO, strings(helo)))[-1].code == b"c"

    async def envelope(
        self,
        sender: str,
        recipients: list[str],
        *,
        login: str | None = None,
        mail_args: tuple[str, ...] = (),
    ) -> list[Answer]:
        """MAIL (with the client's ESMTP `mail_args`) and each RCPT; the answers to the first
        one refused, else to the last."""
        macros = ["auth_authen", login] if login else []
        await self.tell(mp.MACRO, b"M" + strings(*macros))
        answers = await self.ask(mp.MAIL, strings(f"<{sender}>", *mail_args))
        if answers[-1].code != b"c":
            return answers
        for recipient in recipients:
            answers = await self.ask(mp.RCPT, strings(f"<{recipient}>"))
            if answers[-1].code != b"c":
                return answers
        return answers

    async def content(self, raw: bytes, *, queue_id: str = "4ABCDEF") -> list[Answer]:
        """Headers, end of headers, body in 64 KiB chunks, end of message, as Postfix sends
        them (header values with their leading space and LF between folded lines)."""
        head, _, body = raw.partition(b"\r\n\r\n")
        for name, value in unfolded(head):
            answers = await self.ask(mp.HEADER, name + b"\0" + value + b"\0")
            if answers[-1].code != b"c":
                return answers
        answers = await self.ask(mp.EOH)
        if answers[-1].code != b"c":
            return answers
        for start in range(0, len(body), 65535):
            answers = await self.ask(mp.BODY, body[start : start + 65535])
            if answers[-1].code != b"c":
                return answers
        await self.tell(mp.MACRO, b"E" + strings("i", queue_id))
        return await self.ask(mp.BODYEOB)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)

    async def closed_by_peer(self) -> bool:
        """True once the filter has closed the connection (bounded wait)."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read() == b""


def unfolded(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) per header; folded lines joined with LF, as Postfix passes them."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields
