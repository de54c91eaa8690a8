"""One open SMTP conversation with an upstream, after its greeting, EHLO, STARTTLS and AUTH.

aiosmtplib opens the connection and does the handshake; this module then takes the transport
over with a reply reader of its own, because aiosmtplib reads one reply per command written
and drops the rest: with PIPELINING (RFC 2920) offered, RSET, MAIL, every RCPT and DATA leave
in one write and their replies are read back in order, one round trip instead of three or
more. Without it, each command waits for its reply, as RFC 5321 has it.

With CHUNKING (RFC 3030) offered, the copy leaves as one `BDAT <size> LAST` chunk in place
of DATA: its octets as they are, with no dot to double on the way out and no terminator for
the upstream to look for. A small copy (one that is one write anyway) leaves in the same
write as MAIL and RCPT when PIPELINING is offered too, as RFC 3030 4.2 allows: one round trip
per copy instead of two. When every recipient is refused, that chunk has travelled for
nobody and the upstream refuses and throws it away; a chunk's octets are read whatever its
reply, which is what lets BDAT be pipelined at all. A big copy waits for MAIL's and RCPT's
replies, so that megabytes do not leave for nobody, and so does one behind an RSET.

A conversation that fails before the upstream answered anything of the transaction may be
tried again at once on a fresh connection: a kept connection found gone when used. Once the
upstream said 354 to DATA, wrote BDAT's chunk after the replies, or answered MAIL of a
pipelined chunk, never: the upstream could have taken the copy; the copy is deferred.
`ConnectionEnded.before_data` says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

import aiosmtplib

from gateway.mail import headers, lines
from gateway.outbound.stored_copy import Outgoing, StoredCopy
from gateway.watchdog import Watchdog

log = logging.getLogger(__name__)

MAX_LINE = 8192  # one reply line at most, as aiosmtplib allows
MAX_REPLY = 4 * MAX_LINE  # a whole (multi-line) reply at most
PIECE = 256 * 1024
CLOSING = 421  # "service not available, closing transmission channel" (RFC 5321 4.2.3)
QUIT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Reply:
    code: int
    message: str  # the lines of a multi-line reply joined by "\n", as aiosmtplib does

    @property
    def text(self) -> str:
        """The reply on one line, as outcomes and logs show it."""
        return " ".join(f"{self.code} {self.message}".split())


@dataclass(frozen=True)
class Replies:
    """What the upstream answered to one transaction, in the order the commands went.

    `rcpt` has one reply per recipient; `data` is the reply to DATA when it was not 354,
    else the reply after the data (the reply to BDAT with CHUNKING); None when MAIL or every
    RCPT was refused and the data was not sent, or sent in a chunk the upstream refused."""

    mail: Reply
    rcpt: tuple[Reply, ...]
    data: Reply | None


class ConnectionEnded(Exception):
    """The conversation broke (lost, a reply too late or unreadable, or 421); the connection
    is gone. `before_data`: no byte of the message was written, so it may go again elsewhere.
    `reply`: the 421, when the upstream said why."""

    def __init__(self, reason: str, *, before_data: bool, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.before_data = before_data
        self.reply = reply


class BareLineEnd(aiosmtplib.SMTPException):
    """The copy would put a bare CR or LF on the wire; it is kept queued, not sent."""


class SourceFailed(Exception):
    """A stored copy could not be read to its end (the store failed, the blob is gone, ended
    early or changed) while it was sent: the connection is closed before the data's end, so the
    upstream discards what it got. The store's error is the cause."""


def bare_line_end_refusal(data: Outgoing) -> str | None:
    """Why `data` must not leave, logged once with where it breaks; None when every line
    ends in CRLF. Copies are made CRLF-only; this is the last line of defence."""
    offset = data.bare_line_end if isinstance(data, StoredCopy) else lines.bare_line_end(data)
    if offset == -1:
        return None
    return _refused(len(data), offset)


def utf8_header(data: Outgoing) -> bool:
    """Whether the copy's header block holds UTF-8 (RFC 6532): a UTF-8 Subject or display
    name, which SMTPUTF8 is the way to carry even when every address is ASCII."""
    if isinstance(data, StoredCopy):
        return data.utf8_header
    return not headers.header_block(data).isascii()


def _refused(size: int, offset: int) -> str:
    log.error(
        "refusing to send a copy of %d bytes: bare CR or LF at byte %d (SMTP smuggling risk);"
        " the copy stays queued",
        size,
        offset,
    )
    return f"copy not sent: it holds a bare CR or LF at byte {offset}"


def stuffed_pieces(data: bytes, size: int = PIECE) -> Iterator[bytes]:
    """`data` in pieces that start at line starts, each line's leading dot doubled.

    aiosmtplib's own DATA rewrites the whole message three times (line ends, dot-stuffing,
    terminator): for a 10 MB message, ~30 MB more memory per copy in flight."""
    start, end_of_data = 0, len(data)
    while start < end_of_data:
        cut = data.find(b"\r\n", min(start + size, end_of_data))
        end = end_of_data if cut == -1 else cut + 2
        piece = data[start:end]
        if piece.startswith(b"."):
            piece = b"." + piece
        yield lines.stuffed(piece)
        start = end
    if ending := _ending(data):
        yield ending


async def copy_pieces(copy: StoredCopy) -> AsyncIterator[bytes]:
    """The copy's bytes as they are read, in pieces never cut between a CR and its LF (so
    that "CRLF ." is seen whole); SourceFailed when the store fails or the blob is not what
    its first read saw, which found no bare line end in it."""
    held = b""  # a CR at a chunk's end, until its LF is seen
    async with aclosing(copy.chunks()) as chunks:
        while True:
            try:
                chunk = await anext(chunks, None)
            except Exception as exc:
                raise SourceFailed(f"reading the stored copy failed: {exc}") from exc
            if chunk is None:
                break
            data = held + chunk if held else chunk
            held = b""
            if data.endswith(b"\r"):
                data, held = data[:-1], b"\r"
            if data:
                yield data
    if held:
        yield held


async def stuffed_stream(copy: StoredCopy) -> AsyncIterator[bytes]:
    """stuffed_pieces() of a stored copy, read as it is sent: a line's leading dot is
    doubled also where a piece begins at a line start."""
    line_start = True
    async for data in copy_pieces(copy):
        piece = lines.stuffed(data)
        if line_start and data.startswith(b"."):
            piece = b"." + piece
        line_start = data.endswith(b"\n")
        yield piece
    if ending := _ending(copy):
        yield ending


class _ReplyReader(asyncio.Protocol):
    """The transport's protocol once the handshake is done: every reply kept, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replies: deque[Reply] = deque()
        self._lines: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.ended: str | None = None  # why no more replies will come
        self._watchdog: Watchdog | None = None  # bounds each reply and drain awaited

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > MAX_LINE:
            self._end("the upstream sent a reply line too long")
        self._wake()

    def _line(self, line: bytes) -> None:
        code = line[:3]
        if (
            len(line) > MAX_LINE
            or not code.isdigit()
            or line[3:4] not in (b" ", b"-", b"\r", b"\n")
        ):
            self._end(f"the upstream sent no SMTP reply: {line[:80]!r}")
            return
        if not self._lines and line[3:4] != b"-":  # a reply of one line: most of them
            message = line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            self._replies.append(Reply(int(code), message))
            return
        self._lines.append(line)
        if sum(map(len, self._lines)) > MAX_REPLY:
            self._end("the upstream sent a reply too long")
        elif line[3:4] != b"-":
            text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
            self._replies.append(Reply(int(code), text.decode("utf-8", "surrogateescape")))
            self._lines = []

    def eof_received(self) -> bool:
        self._end("the upstream closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "the upstream closed the connection")
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._watchdog is not None:
            self._watchdog.close()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def unread(self) -> bool:
        """Whether the upstream said something nobody asked for (an idle 421, typically)."""
        return bool(self._replies or self._buffer or self._lines)

    async def reply(self, reply_timeout: float) -> Reply:
        """The next reply; TimeoutError when none came in `reply_timeout` seconds."""
        if self._replies:  # pipelined replies often come together: no wait for those
            return self._replies.popleft()
        watchdog = self._watch(reply_timeout)
        try:
            while not self._replies:
                if self.ended is not None:
                    raise ConnectionError(self.ended)
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            watchdog.rest()
        return self._replies.popleft()

    async def drained(self, reply_timeout: float) -> None:
        """Until the transport takes more: an upstream that stops reading raises TimeoutError
        instead of holding the copy forever."""
        if self._writable is not None:
            watchdog = self._watch(reply_timeout)
            try:
                await self._writable
            finally:
                watchdog.rest()

    def _watch(self, seconds: float) -> Watchdog:
        """One timer for the connection's waits, not one per wait (two or three per copy)."""
        if self._watchdog is None:
            self._watchdog = Watchdog(asyncio.get_running_loop(), self._overdue)
        self._watchdog.due_in(seconds)
        return self._watchdog

    def _overdue(self) -> None:
        waiting = self._waiter if self._waiter is not None else self._writable
        if waiting is not None and not waiting.done():
            waiting.set_exception(TimeoutError())


class SmtpConnection:
    """An open, greeted (and when offered, encrypted and logged-in) connection, ready for MAIL.

    `remote` is the host outcomes name as the one that answered (the smart host, or the MX
    host); `where` names it for connection errors (host[:address]:port).
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        extensions: set[str],
        *,
        remote: str,
        where: str,
        pipelining: bool,
        chunking: bool,
    ) -> None:
        self._transport = transport
        self._reader = _ReplyReader()
        transport.set_protocol(self._reader)
        self.remote = remote
        self.where = where
        self.pipelining = pipelining and "pipelining" in extensions
        self.chunking = chunking and "chunking" in extensions
        self.size = "size" in extensions
        self.smtputf8 = "smtputf8" in extensions
        self.opened_at = time.monotonic()
        self.messages = 0  # transactions begun on it
        self.usable = True  # False once anything went wrong: never reused then
        self._in_transaction = False  # a transaction was begun and not ended: RSET first
        self._data_started = False

    @classmethod
    async def adopt(
        cls,
        client: aiosmtplib.SMTP,
        *,
        remote: str,
        where: str,
        pipelining: bool,
        chunking: bool,
    ) -> SmtpConnection:
        """Take over `client`'s transport after its handshake; the client is not used again.

        EHLO (HELO for a server from before ESMTP) first when the client has not greeted
        since connecting or since TLS began, as aiosmtplib's MAIL would."""
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()
        transport = client.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        extensions = set(client.esmtp_extensions)
        client.transport = None
        client.protocol = None
        return cls(
            cast(asyncio.Transport, transport),
            extensions,
            remote=remote,
            where=where,
            pipelining=pipelining,
            chunking=chunking,
        )

    @property
    def alive(self) -> bool:
        """Usable, still open, and nothing unasked-for came (an idle upstream's 421)."""
        return self.usable and not self._transport.is_closing() and not self._reader.unread

    async def send(
        self, mail_from: str, recipients: Sequence[str], data: Outgoing, reply_timeout: float
    ) -> Replies:
        """One transaction: RSET when one begun before did not end (MAIL answered, no data
        sent: every recipient refused one at a time), MAIL, RCPT each, DATA and the data, or
        BDAT with the data when the upstream offers CHUNKING.

        Each reply and each piece's drain gets `reply_timeout`. A copy with a bare CR or LF is
        refused before any byte is written (BareLineEnd): a receiver that ends the data at
        LF "." CRLF would read what follows as a second message. A stored copy that cannot
        be read to its end as it was first read (SourceFailed) closes the connection before
        the data's end: the upstream takes nothing. A UTF-8 address goes with MAIL's SMTPUTF8
        (RFC 6531), which the upstream must offer (upstream.transaction sees to it); so does a
        UTF-8 header block where the upstream offers it. One that does not offer it gets
        such a copy as 8-bit data, as mail without SMTPUTF8 always went: no address needs
        it, and a receiver that takes 8-bit headers shows them.
        """
        if (problem := bare_line_end_refusal(data)) is not None:
            raise BareLineEnd(problem)
        utf8 = False
        for address in (mail_from, *recipients):
            if headers.has_control(address):
                raise ValueError(f"address with a control character: {address!r}")
            utf8 = utf8 or not address.isascii()
        if utf8 and not self.smtputf8:
            raise ValueError(f"{self.where} does not offer SMTPUTF8 for a UTF-8 address")
        smtputf8 = utf8 or (self.smtputf8 and utf8_header(data))
        size = len(data) + len(_ending(data))
        mail = (
            f"MAIL FROM:<{mail_from}>"
            + (f" SIZE={size}" if self.size else "")
            + (" SMTPUTF8" if smtputf8 else "")
        )
        commands = [
            *(["RSET"] if self._in_transaction else []),
            mail,
            *(f"RCPT TO:<{recipient}>" for recipient in recipients),
            *(() if self.chunking else ("DATA",)),
        ]
        encoding = "utf-8" if utf8 else "ascii"
        encoded = [f"{command}\r\n".encode(encoding) for command in commands]
        self.messages += 1
        self._in_transaction = True
        try:
            return await self._transaction(encoded, len(recipients), data, reply_timeout)
        except (ConnectionError, OSError, TimeoutError) as exc:
            self.close()
            raise ConnectionEnded(
                f"{self.where}: {_reason(exc)}", before_data=not self._data_started
            ) from exc
        except BaseException:  # ConnectionEnded, or the caller's deadline: mid-conversation
            self.close()
            raise

    async def _transaction(
        self, commands: list[bytes], recipients: int, data: Outgoing, reply_timeout: float
    ) -> Replies:
        self._data_started = False
        reset = commands[0] == b"RSET\r\n"
        small = isinstance(data, bytes) and len(data) <= PIECE  # a big one waits for replies
        if small and self.pipelining and self.chunking and not reset:
            return await self._envelope_and_chunk(commands, cast(bytes, data), reply_timeout)
        replies: list[Reply] = []
        if self.pipelining:
            self._write(b"".join(commands))
            for _ in commands:
                replies.append(await self._reply(reply_timeout))
        else:
            for command in commands:
                self._write(command)
                reply = await self._reply(reply_timeout)
                replies.append(reply)
                if command == b"RSET\r\n":
                    if not _ok(reply):
                        raise ConnectionEnded(
                            f"{self.where}: RSET refused: {reply.text}", before_data=True
                        )
                elif command.startswith(b"MAIL ") and not _ok(reply):
                    return Replies(reply, (), None)  # no RCPT without a sender
                elif len(replies) == reset + 1 + recipients:
                    rcpts = tuple(replies[reset + 1 :])
                    if not any(map(_accepted, rcpts)):
                        return Replies(replies[reset], rcpts, None)  # DATA for nobody
        if reset and not _ok(replies[0]):
            raise ConnectionEnded(
                f"{self.where}: RSET refused: {replies[0].text}", before_data=True
            )
        if self.chunking:
            return await self._chunk(
                replies[reset], tuple(replies[1 + reset :]), data, reply_timeout
            )
        mail, rcpt, go = replies[reset], tuple(replies[1 + reset : -1]), replies[-1]
        if go.code != 354:
            return Replies(mail, rcpt, go)
        if not _ok(mail) or not any(map(_accepted, rcpt)):
            # RFC 2920 3.1: nobody to send to, yet the upstream waits for data; end it empty
            self._write(b".\r\n")
            await self._reply(reply_timeout)
            self._in_transaction = False
            return Replies(mail, rcpt, None)
        self._data_started = True
        last = b""
        if isinstance(data, StoredCopy):  # big: no piece is held while the next is read
            async for piece in stuffed_stream(data):
                await self._write_drained(piece, reply_timeout)
        else:
            # the last piece leaves with the terminator: a small copy is one write (one
            # send, one wake-up of the upstream), not two
            for piece in stuffed_pieces(data):
                await self._write_drained(last, reply_timeout)
                last = piece
        self._write(last + b".\r\n")
        reply = await self._reply(reply_timeout)
        self._in_transaction = False  # ended by its reply: the next MAIL needs no RSET
        return Replies(mail, rcpt, reply)

    async def _envelope_and_chunk(
        self, commands: list[bytes], data: bytes, reply_timeout: float
    ) -> Replies:
        """MAIL, each RCPT and the copy's one chunk in one write, their replies read in order.

        Until MAIL is answered, a break is most likely a kept connection found gone, and the
        copy goes again at once on a new one. Had the upstream taken it all the same (Postfix's
        smtpd answers a pipelined group once it has queued the message), a deferral would send
        the same duplicate later. Once MAIL is answered, the upstream is reading this
        transaction, and a break defers the copy as one after DATA's 354 does."""
        self._write(b"".join([*commands, _bdat_last(data), data, _ending(data)]))
        mail = await self._reply(reply_timeout)
        self._data_started = True
        rcpt = tuple([await self._reply(reply_timeout) for _ in commands[1:]])
        reply = await self._reply(reply_timeout)
        self._in_transaction = not _ok(reply)
        if not _ok(mail) or not any(map(_accepted, rcpt)):
            return Replies(mail, rcpt, None)  # the chunk was refused for want of a recipient
        return Replies(mail, rcpt, reply)

    async def _chunk(
        self, mail: Reply, rcpt: tuple[Reply, ...], data: Outgoing, reply_timeout: float
    ) -> Replies:
        """The copy as one `BDAT <size> LAST` chunk, when MAIL and a recipient were taken.

        A refused BDAT leaves the transaction begun (RFC 3030 4.2: the sender sends no more
        chunks), so the next one starts with RSET."""
        if not _ok(mail) or not any(map(_accepted, rcpt)):
            return Replies(mail, rcpt, None)
        ending = _ending(data)
        self._data_started = True
        command = _bdat_last(data)
        if isinstance(data, StoredCopy):
            self._write(command)
            async for piece in copy_pieces(data):
                await self._write_drained(piece, reply_timeout)
            self._write(ending)
        elif len(data) <= PIECE:
            self._write(command + data + ending)
        else:
            self._write(command)
            view = memoryview(data)
            for start in range(0, len(data), PIECE):
                await self._write_drained(view[start : start + PIECE], reply_timeout)
            self._write(ending)
        reply = await self._reply(reply_timeout)
        self._in_transaction = not _ok(reply)
        return Replies(mail, rcpt, reply)

    async def _write_drained(self, piece: bytes | memoryview, reply_timeout: float) -> None:
        if piece:
            self._write(piece)
            await self._reader.drained(reply_timeout)

    async def _reply(self, reply_timeout: float) -> Reply:
        reply = await self._reader.reply(reply_timeout)
        if reply.code == CLOSING:
            raise ConnectionEnded(reply.text, before_data=not self._data_started, reply=reply)
        return reply

    def _write(self, data: bytes | memoryview) -> None:
        if self._transport.is_closing():
            raise ConnectionError(self._reader.ended or "connection lost")
        self._transport.write(data)

    async def quit(self) -> None:
        """QUIT and its reply (shortly), then close: the polite end of a kept connection."""
        try:
            if not self._transport.is_closing():
                self._transport.write(b"QUIT\r\n")
                with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                    await self._reader.reply(QUIT_TIMEOUT)
        finally:
            self.close()

    def close(self) -> None:
        self.usable = False
        self._transport.close()


def _ending(data: Outgoing) -> bytes:
    """What the copy needs after it to end in CRLF, as DATA ends it: RFC 5322's lines all
    end so, and the upstream keeps the octets a chunk carries as they are."""
    if isinstance(data, StoredCopy):
        return b"" if data.ends_in_crlf else b"\r\n"
    return b"" if not data or data.endswith(b"\r\n") else b"\r\n"


def _bdat_last(data: Outgoing) -> bytes:
    return f"BDAT {len(data) + len(_ending(data))} LAST\r\n".encode("ascii")


def _ok(reply: Reply) -> bool:
    return reply.code == 250


def _accepted(reply: Reply) -> bool:
    return reply.code in (250, 251)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no reply in time"
    return str(exc) or type(exc).__name__
