"""The milter protocol (version 6), the MTA side's filter API spoken by Postfix and Sendmail.

Our own small asyncio implementation rather than a library: pymilter wraps libmilter, a C
library that runs each connection on a thread of its own and calls back into Python, which
fits neither our event loop nor our database sessions; the pure-Python asyncio packages
(purepythonmilter 0.0.1, kilter-protocol) are early single-maintainer releases whose
framing we would have to audit anyway. The protocol itself is small: length-prefixed
packets, a dozen commands, a dozen replies; this module is only that, and knows nothing
of messages or the pipeline (gateway/fronts/milter.py is the front that uses it).

A packet is a 4-byte big-endian length (of what follows), one command byte and its data.
Negotiation (SMFIC_OPTNEG) asks for what the front needs: to add and delete headers, the
`{auth_authen}` and queue-id macros, leading spaces kept in header values (so the message
is rebuilt byte for byte), and neither SMFIC_DATA nor unknown SMTP commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.fronts.reply_text import printable

log = logging.getLogger(__name__)

VERSION = 6
MAX_PACKET = 1024 * 1024  # bytes; Postfix sends body chunks of at most 64 KiB

# commands (MTA -> filter)
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# replies (filter -> MTA)
R_ADDHEADER = b"h"
R_CHGHEADER = b"m"
R_ACCEPT = b"a"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_REPLYCODE = b"y"
R_TEMPFAIL = b"t"
R_REJECT = b"r"

# actions the filter may take (SMFIF_*)
ADD_HEADERS = 0x01
CHANGE_HEADERS = 0x10
SET_SYMBOL_LIST = 0x100

# protocol steps the filter does not want (SMFIP_*)
NO_UNKNOWN = 0x100
NO_DATA = 0x200
HEADER_LEADING_SPACE = 0x100000

# the macros asked for, per stage (SMFIM_*): the login at MAIL, Postfix's queue id at the end
MACRO_STAGES = {2: "{auth_authen} {auth_type}", 5: "i"}


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed without a reply."""


@dataclass(frozen=True)
class Reply:
    """One reply packet."""

    code: bytes
    data: bytes = b""

    def packet(self) -> bytes:
        return struct.pack("!I", len(self.data) + 1) + self.code + self.data


CONTINUE = Reply(R_CONTINUE)
ACCEPT = Reply(R_ACCEPT)
DISCARD = Reply(R_DISCARD)
TEMPFAIL = Reply(R_TEMPFAIL)
REJECT = Reply(R_REJECT)


def reply_code(text: str) -> Reply:
    """An SMTP reply for the MTA to give ("550 5.7.1 sentence"): a 4xx tempfails, a 5xx
    rejects. One line of printable ASCII (`printable`); sendmail expands `%`, so it is
    doubled."""
    line = " ".join(text.split())
    if len(line) < 4 or line[0] not in "45" or not line[:3].isdigit() or line[3] != " ":
        raise ValueError(f"not an SMTP 4xx/5xx reply: {text!r}")
    return Reply(R_REPLYCODE, printable(line).replace("%", "%%").encode("ascii") + b"\0")


def add_header(name: str, value: str) -> Reply:
    return Reply(R_ADDHEADER, _cstring(name) + _cstring(value))


def delete_header(name: str, index: int) -> Reply:
    """Remove the `index`-th (from 1) header called `name`: a change to an empty value."""
    return Reply(R_CHGHEADER, struct.pack("!I", index) + _cstring(name) + b"\0")


def _spaced(reply: Reply) -> Reply:
    """With leading spaces kept, the MTA also takes our values as they are: an added
    header would read `Name:value`, so it gets the space the filter API otherwise adds."""
    if reply.code not in (R_ADDHEADER, R_CHGHEADER):
        return reply
    offset = 4 if reply.code == R_CHGHEADER else 0
    name_end = reply.data.index(b"\0", offset) + 1
    value = reply.data[name_end:]
    if value == b"\0":  # an empty value deletes the header
        return reply
    return Reply(reply.code, reply.data[:name_end] + b" " + value)


def _cstring(text: str) -> bytes:
    data = text.encode("utf-8", errors="replace")
    if b"\0" in data:
        raise ValueError("a NUL in a milter string")
    return data + b"\0"


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (local socket) or "U" (unknown)
    port: int
    address: str


class Filter(Protocol):
    """One SMTP session's filter; each method answers its stage with one reply packet.

    `macros` is what the MTA has sent so far for this session and message.
    """

    macros: dict[str, str]

    async def connect(self, info: Connect) -> Reply: ...
    async def helo(self, name: str) -> Reply: ...
    async def mail(self, args: list[str]) -> Reply: ...
    async def rcpt(self, args: list[str]) -> Reply: ...
    async def header(self, name: str, value: bytes) -> Reply: ...
    async def end_of_headers(self) -> Reply: ...
    async def body(self, chunk: bytes) -> Reply: ...
    async def end_of_message(self) -> list[Reply]:
        """Modifications (add/delete header) followed by exactly one final reply."""
        ...

    def abort(self) -> None:
        """The message under way is dropped (SMFIC_ABORT, or the connection ended)."""
        ...


@dataclass(frozen=True)
class Negotiated:
    actions: int
    steps: int


def negotiate(data: bytes) -> tuple[Negotiated, Reply]:
    """Our answer to SMFIC_OPTNEG: only what the MTA offers, and only what we need."""
    if len(data) < 12:
        raise ProtocolError(f"option negotiation of {len(data)} bytes, 12 expected")
    version, offered_actions, offered_steps = struct.unpack("!III", data[:12])
    if version < 2:
        raise ProtocolError(f"milter version {version} is too old")
    actions = (ADD_HEADERS | CHANGE_HEADERS | SET_SYMBOL_LIST) & offered_actions
    steps = (NO_UNKNOWN | NO_DATA | HEADER_LEADING_SPACE) & offered_steps
    answer = struct.pack("!III", min(version, VERSION), actions, steps)
    if actions & SET_SYMBOL_LIST:
        for stage, names in MACRO_STAGES.items():
            answer += struct.pack("!I", stage) + _cstring(names)
    return Negotiated(actions, steps), Reply(OPTNEG, answer)


def _strings(data: bytes) -> list[str]:
    """NUL-terminated strings; bytes that are not UTF-8 are replaced, never trusted."""
    if not data.endswith(b"\0"):
        raise ProtocolError("a string without its terminating NUL")
    return [part.decode("utf-8", errors="replace") for part in data[:-1].split(b"\0")]


def parse_connect(data: bytes) -> Connect:
    hostname_end = data.find(b"\0")
    if hostname_end < 0 or len(data) < hostname_end + 2:
        raise ProtocolError("a garbled SMFIC_CONNECT")
    hostname = data[:hostname_end].decode("utf-8", errors="replace")
    family = chr(data[hostname_end + 1])
    rest = data[hostname_end + 2 :]
    if family == "U":
        return Connect(hostname, family, 0, "")
    if len(rest) < 3:
        raise ProtocolError("a garbled SMFIC_CONNECT address")
    (port,) = struct.unpack("!H", rest[:2])
    (address,) = _strings(rest[2:])[:1]
    return Connect(hostname, family, port, address)


def parse_macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """The stage (a command byte) and its macros; names lose sendmail's braces."""
    if not data:
        raise ProtocolError("an empty SMFIC_MACRO")
    stage, rest = data[:1], data[1:]
    values = _strings(rest) if rest else []
    if len(values) % 2:
        raise ProtocolError("a macro without a value")
    pairs = zip(values[::2], values[1::2], strict=True)
    return stage, {name.strip("{}"): value for name, value in pairs}


def parse_header(data: bytes) -> tuple[str, bytes]:
    name_end = data.find(b"\0")
    if name_end < 0 or not data.endswith(b"\0") or name_end == len(data) - 1:
        raise ProtocolError("a garbled SMFIC_HEADER")
    name = data[:name_end].decode("ascii", errors="replace")
    return name, data[name_end + 1 : -1]


class MilterConnection:
    """One MTA connection: read packets, hand them to the filter, write its replies.

    Ends on SMFIC_QUIT, at end of stream, on a protocol error, or after `timeout` seconds of
    silence; in each case a message under way is aborted, so nothing half-read is kept.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        new_filter: Callable[[], Filter],
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.new_filter = new_filter
        self.timeout = timeout
        self.filter = new_filter()
        self.negotiated: Negotiated | None = None
        self.stage_macros: dict[bytes, dict[str, str]] = {}
        self.busy = False  # between a command and its reply

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername")
        try:
            while True:
                packet = await self._read()
                if packet is None:
                    return
                if not await self._handle(*packet):
                    return
        except ProtocolError as exc:
            log.warning("milter connection from %s: %s; closing it", peer, exc)
        except (ConnectionError, TimeoutError) as exc:
            log.info("milter connection from %s ended: %s", peer, type(exc).__name__)
        finally:
            self.filter.abort()
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()

    async def _read(self) -> tuple[bytes, bytes] | None:
        """The next (command, data); None at a clean end of stream between packets."""
        async with asyncio.timeout(self.timeout):
            try:
                head = await self.reader.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ProtocolError("the stream ended inside a packet length") from exc
                return None
            (length,) = struct.unpack("!I", head)
            if length == 0 or length > MAX_PACKET:
                raise ProtocolError(f"a packet of {length} bytes")
            try:
                packet = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise ProtocolError("the stream ended inside a packet") from exc
        return packet[:1], packet[1:]

    async def _send(self, *replies: Reply) -> None:
        if self.negotiated is not None and self.negotiated.steps & HEADER_LEADING_SPACE:
            replies = tuple(_spaced(reply) for reply in replies)
        self.writer.write(b"".join(reply.packet() for reply in replies))
        await self.writer.drain()

    def _macros(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for values in self.stage_macros.values():
            merged.update(values)
        return merged

    def _forget_message_macros(self) -> None:
        for stage in (MAIL, RCPT, DATA, EOH, BODYEOB, HEADER, BODY):
            self.stage_macros.pop(stage, None)

    async def _handle(self, command: bytes, data: bytes) -> bool:
        """Answer one command; False ends the connection."""
        if command == OPTNEG:
            self.negotiated, answer = negotiate(data)
            await self._send(answer)
            return True
        if command == MACRO:
            stage, values = parse_macros(data)
            self.stage_macros[stage] = values
            self.filter.macros = self._macros()
            return True
        if command == ABORT:
            self.filter.abort()
            self._forget_message_macros()
            self.filter.macros = self._macros()
            return True
        if command == QUIT:
            return False
        if command == QUIT_NC:  # the MTA reuses the connection for a new SMTP session
            self.filter.abort()
            self.stage_macros.clear()
            self.filter = self.new_filter()
            return True
        if self.negotiated is None:
            raise ProtocolError(f"command {command!r} before option negotiation")
        self.busy = True
        try:
            replies = await self._dispatch(command, data)
        finally:
            self.busy = False
        await self._send(*replies)
        if command == BODYEOB:
            self._forget_message_macros()
            self.filter.macros = self._macros()
        return True

    async def _dispatch(self, command: bytes, data: bytes) -> list[Reply]:
        filt = self.filter
        if command == CONNECT:
            return [await filt.connect(parse_connect(data))]
        if command == HELO:
            return [await filt.helo(_strings(data)[0])]
        if command == MAIL:
            return [await filt.mail(_strings(data))]
        if command == RCPT:
            return [await filt.rcpt(_strings(data))]
        if command == HEADER:
            name, value = parse_header(data)
            assert self.negotiated is not None
            if not self.negotiated.steps & HEADER_LEADING_SPACE:
                value = b" " + value  # the MTA took off the space after the colon
            return [await filt.header(name, value)]
        if command == EOH:
            return [await filt.end_of_headers()]
        if command == BODY:
            return [await filt.body(data)]
        if command == BODYEOB:
            if data:
                reply = await filt.body(data)
                if reply != CONTINUE:
                    return [reply]
            return await filt.end_of_message()
        if command in (DATA, UNKNOWN):  # asked not to get them; an MTA may still send
            return [CONTINUE]
        raise ProtocolError(f"unknown command {command!r}")
