"""The submission front's SMTP session: framing, state and replies, driven by the connection.

An `asyncio.Protocol`, not a task per connection reading a stream: each piece the client
sends is split into lines in `data_received`, and a command that can be answered at once is
answered there. Only what must wait (a password check, a trusted client's sender lookup,
the pipeline's answer to DATA, a TLS handshake) runs in a task, one at a time; while it runs
further input is kept, not read (RFC 2920: replies in the order of the commands), and
reading pauses once too much is kept. Replies are gathered and leave in one write per batch
of pipelined commands. aiosmtpd's protocol cost about twice the CPU per message for the same
conversation (bench/README.md); its reply texts are kept where clients and tests see them.

DATA is fed to a `DataFeed` (gateway/fronts/data_reader.py) as it arrives and is never read
as commands. The session's silence is watched by a `Watchdog`: every command and piece of
DATA restarts it, and it stands still while the relay works on a message.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import ssl
from base64 import b64decode, b64encode
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol

from aiosmtpd.proxy_protocol import ProxyData

from gateway import users
from gateway.fronts import tls_layer, trusted
from gateway.fronts.byte_budget import ByteBudget
from gateway.fronts.client_address import client_address
from gateway.fronts.data_reader import WINDOW, DataFeed, Spooled
from gateway.fronts.proxy_header import ProxyPolicy, header_length, parse_header, proxied_client
from gateway.fronts.reply_text import printable
from gateway.fronts.smtp_guard import ConnectionGate, Refusal
from gateway.fronts.smtp_paths import (
    after_keyword,
    mail_parameters_problem,
    parameters,
    read_path,
)
from gateway.fronts.smtp_replies import Reply, count
from gateway.fronts.trusted import ClientFacts, TrustedEntry, TrustedMatch
from gateway.intake.pipeline import Received
from gateway.watchdog import Watchdog

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = tls_layer.HANDSHAKE_TIMEOUT
COMMAND_LIMIT = 512  # octets of a command line (RFC 5321 4.5.3.1.4), as aiosmtpd counts them
MAIL_LIMIT = COMMAND_LIMIT + 26  # MAIL after EHLO, for SIZE= (RFC 1870)
LINE_LIMIT = 1001  # a longer line is thrown away while its end is awaited
DATA_LINE_LIMIT = 1001  # octets of a DATA line with its CRLF, 1000 (RFC 5321 4.5.3.1.6), as before
BOGUS_LIMIT = 5  # unknown commands a session may send; the fifth ends it
KEPT_WHILE_BUSY = 64 * 1024  # octets kept while a command is worked on before reading pauses
SPOOL_BEHIND = 4 * WINDOW  # octets of DATA not yet spooled before reading pauses
BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})  # RFC 3207 part 4
HELP_SYNTAX = {
    "AUTH": "AUTH <mechanism>",
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM: <address>",
    "NOOP": "NOOP [ignored]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO: <address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}
EXTENDED_SYNTAX = " [SP <mail-parameters>]"  # MAIL and RCPT after EHLO
MECHANISMS = ("LOGIN", "PLAIN")


class SessionHandler(Protocol):
    """What the session asks of the checks behind it (gateway/fronts/smtp.py)."""

    async def authenticate(
        self, session: SubmissionSMTP, mechanism: str, args: list[str]
    ) -> None: ...

    def agent_sender(self, session: SubmissionSMTP, address: str, options: list[str]) -> str: ...

    async def trusted_sender(
        self, session: SubmissionSMTP, address: str, options: list[str]
    ) -> None: ...

    def recipient(self, session: SubmissionSMTP, address: str, options: list[str]) -> str: ...

    async def handle_DATA(self, session: SubmissionSMTP, raw: bytes) -> str: ...

    def handle_exception(self, error: Exception) -> str: ...


@dataclass(frozen=True)
class Listener:
    """What every session on one listening socket shares."""

    handler: SessionHandler
    gate: ConnectionGate
    hostname: str
    timeout: float
    size_limit: int | None
    tls: ssl.SSLContext | None = None  # offered by STARTTLS
    require_tls: bool = False  # AUTH, and with `tls` every command but a few, wait for TLS
    implicit_tls: ssl.SSLContext | None = None  # the handshake follows the PROXY header
    proxy: ProxyPolicy | None = None
    trusted: tuple[TrustedEntry, ...] = ()
    spool_dir: Path | None = None
    data_budget: ByteBudget | None = None  # received messages in memory at once
    ehlo_reply: dict[bool, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """EHLO's reply is the same for every session of the listener but for TLS: both
        forms are written once here, each line through `printable` as every reply is."""
        replies = {secure: self._ehlo_lines(secure) for secure in (False, True)}
        object.__setattr__(self, "ehlo_reply", replies)

    def _ehlo_lines(self, secure: bool) -> bytes:
        lines = [self.hostname]
        if self.size_limit:
            lines.append(f"SIZE {self.size_limit}")
        lines += ["8BITMIME", "SMTPUTF8"]
        if self.tls is not None and not secure:
            lines.append("STARTTLS")
        if not self.require_tls or secure:
            lines.append("AUTH " + " ".join(MECHANISMS))
        lines += ["ENHANCEDSTATUSCODES", "PIPELINING", "HELP"]
        last = len(lines) - 1
        return b"".join(
            printable(f"250{' ' if i == last else '-'}{line}").encode("ascii") + b"\r\n"
            for i, line in enumerate(lines)
        )


class SubmissionSMTP(asyncio.Protocol):
    """One SMTP session. Its commands are the `smtp_*` methods, each given its argument."""

    COMMANDS: ClassVar[dict[str, Callable[[SubmissionSMTP, str | None], None]]]

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer: object = None  # the TCP peer, or the client a PROXY header named
        self.host_name = ""  # as HELO or EHLO gave it
        self.extended_smtp = False
        self.agent: users.Agent | None = None
        self.auth_failures = 0
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.rcpt_tried = False  # an RCPT came after MAIL, though maybe refused
        self.sender_domains: frozenset[str] = frozenset()  # a trusted client's, as MAIL found
        self.received: Received | None = None  # what the spool learned, during the DATA hook
        self.closed = asyncio.Event()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._busy: asyncio.Task[None] | None = None
        self._data: DataFeed | None = None
        self._line_wanted: asyncio.Future[bytes | None] | None = None
        self._awaiting_header = False
        self._admitted: str | None = None  # the client address while the gate counts it
        self._refused = False
        self._ended = False
        self._closing = False
        self._discarding = False  # after STARTTLS, until the handshake
        self._paused = False
        self._too_long = False  # a line over LINE_LIMIT is thrown away up to its end
        self._stopping = False
        self._bogus = BOGUS_LIMIT
        self._trusted_found: tuple[tuple[str, object], TrustedMatch | None] | None = None
        self._idle = Watchdog(asyncio.get_running_loop(), self._timed_out)

    # -- the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The gate decides before anything is said; behind a proxy it waits for the header."""
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        self.peer = transport.get_extra_info("peername")
        address = client_address(self)
        gate = self.listener.gate
        proxy = self.listener.proxy
        if proxy is not None:
            if not proxy.trusted(address):
                gate.refusals.warning(
                    "not-a-proxy", "closed a connection from %s: not in smtp.proxy_from", address
                )
                self._refuse(None)
            elif gate.open_total >= gate.total:
                self._refuse(Refusal.BUSY)
            else:
                gate.sessions.add(self)  # so that stopping the relay closes it too
                self._awaiting_header = True
                log.debug("%s: handling connection, waiting for its PROXY header", address)
                self._idle.due_in(proxy.timeout)
            return
        refusal = gate.admit(address)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._admitted = address
        gate.enter(self)
        self._greet()

    def _greet(self) -> None:
        self.reply(f"220 {self.listener.hostname} sealrelay")
        self._flush()
        self._reset_timeout()

    def _refuse(self, refusal: str | None) -> None:
        self._refused = True
        assert self.transport is not None
        if refusal is not None:
            self.transport.write(count(refusal).encode("ascii") + b"\r\n")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._ended or self._discarding:
            return
        if self._data is not None:
            self._reset_timeout()
            self._take_data(data)
            return
        self._buffer += data
        if self._awaiting_header:
            self._read_header()
        elif self._line_wanted is not None:
            self._give_line()
        elif self._busy is None:
            self._process()
        elif len(self._buffer) > KEPT_WHILE_BUSY:
            self._pause()

    def eof_received(self) -> bool:
        """Close at the client's EOF: a half-open connection would hold its place at the
        gate until the idle timeout."""
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self._end()
        if self._busy is not None:
            self._busy.cancel()  # a message cut off gets no 250 and stores nothing
        self._let_go()

    def _end(self) -> None:
        """The session is over: it leaves the gate, once."""
        if self._ended:
            return
        self._ended = True
        self._idle.stop()
        self.closed.set()
        gate = self.listener.gate
        if self._admitted is not None:
            gate.release(self._admitted, self)
            self._admitted = None
        gate.sessions.discard(self)

    def _let_go(self) -> None:
        """Drop what refers back to the session (transport, timer, DATA feed), so that it
        is freed by reference counting when it ends: sessions left in cycles waited for the
        collector's full passes, which stopped the loop for milliseconds (bench/README.md)."""
        self._idle.close()
        self.transport = None
        self._data = None
        self._buffer = bytearray()
        self._out = []

    # -- input

    def _process(self) -> None:
        """Commands from the buffer, until it holds no whole line or one must wait."""
        buffer = self._buffer
        start = 0
        while self._busy is None and self._data is None and not self._closing:
            end = buffer.find(b"\n", start)
            if end == -1:
                if len(buffer) - start > LINE_LIMIT:
                    self._too_long = True
                    start = len(buffer)
                break
            line = bytes(buffer[start:end])
            start = end + 1
            if self._too_long or len(line) > LINE_LIMIT:
                self._too_long = False
                self.reply("500 5.5.2 Error: command line too long")
                continue
            self._command(line)
        if self._discarding or self._closing:
            buffer.clear()  # RFC 3207: what came behind STARTTLS is never read
        else:
            del buffer[:start]
        if self._data is not None and buffer:  # DATA began: its first octets came along
            rest = bytes(buffer)
            buffer.clear()
            self._take_data(rest)
        self._flush()
        if self._busy is None and len(buffer) <= KEPT_WHILE_BUSY:
            self._resume()

    def _command(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line:
            self.reply("500 5.5.2 Error: bad syntax")
            return
        word, _, rest = line.partition(b" ")
        try:
            command = word.upper().decode("ascii")
        except UnicodeDecodeError:
            self.reply("500 5.5.2 Error: bad syntax")
            return
        arg = None
        if rest:
            path = command in ("MAIL", "RCPT")  # RFC 6531: an address may be UTF-8
            try:
                arg = rest.strip().decode("utf-8" if path else "ascii")
            except UnicodeDecodeError:
                if path:
                    self.reply(Reply.NOT_UTF8_ADDRESS)
                else:
                    self.reply("500 5.5.2 Error: only ASCII is accepted in commands")
                return
        limit = MAIL_LIMIT if command == "MAIL" and self.extended_smtp else COMMAND_LIMIT
        if len(line) > limit:
            self.reply("500 5.5.2 Error: command line too long")
            return
        if command not in BEFORE_STARTTLS and self._starttls_needed():
            self.reply("530 5.7.0 Must issue a STARTTLS command first")
            return
        method = self.COMMANDS.get(command)
        if method is None:
            self._bogus -= 1
            if self._bogus < 1:
                log.warning("%s: too many unknown commands", client_address(self))
                self.reply("502 5.5.1 Too many unrecognized commands, goodbye.")
                self.close()
                return
            self.reply(f'500 5.5.1 Error: command "{command}" not recognized')
            return
        self._reset_timeout()
        method(self, arg)

    def _give_line(self) -> None:
        """A line the session awaits (an AUTH answer) instead of a command; None for one
        over LINE_LIMIT, as `_process` counts it, whether it came in one piece or many (the
        octets of one whose end is still awaited are thrown away as they come)."""
        waiter = self._line_wanted
        if waiter is None:
            return
        end = self._buffer.find(b"\n")
        if end == -1:
            if len(self._buffer) > LINE_LIMIT:
                self._too_long = True
                self._buffer.clear()
            return
        too_long = self._too_long or end > LINE_LIMIT
        line = None if too_long else bytes(self._buffer[: end + 1])
        self._too_long = False
        del self._buffer[: end + 1]
        self._line_wanted = None
        if not waiter.done():
            waiter.set_result(line)

    async def read_line(self) -> bytes | None:
        """The client's next line, read while a command's task runs; None for one too long.
        The client's turn: the idle timer runs until the line is here."""
        self._flush()
        wanted: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._line_wanted = wanted
        self._reset_timeout()
        self._give_line()  # the line may be here already
        line = await wanted
        self._idle.rest()
        return line

    def _take_data(self, data: bytes) -> None:
        feed = self._data
        assert feed is not None
        end = feed.feed(data)
        if end is None:
            if feed.pending > SPOOL_BEHIND:
                self._pause()
            return
        self._data = None
        self._idle.rest()  # the client waits for the relay now
        self._buffer += memoryview(data)[end:]

    def _spool_caught_up(self) -> None:
        if self._data is not None and self._data.pending <= SPOOL_BEHIND // 2:
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self._ended:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self._ended:
            self._paused = False
            self.transport.resume_reading()

    # -- output

    def reply(self, text: str) -> None:
        """One line of a reply, sent with the others of its batch (`_flush`); one that holds
        anything but printable ASCII is made to (`printable`)."""
        if not (text.isascii() and text.isprintable()):
            text = printable(text)
        self._out.append(text.encode("ascii") + b"\r\n")

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        """Ends the session once the replies given so far are written."""
        self._closing = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- what must wait runs in a task

    def _run(
        self, work: Callable[[], Coroutine[Any, Any, None]], *, client_first: bool = False
    ) -> None:
        """`work` in a task; made there, so that a task cancelled before its first step
        leaves no coroutine that was never awaited.

        While it works (a password checked, a sender looked up) the client waits for us, and
        the idle timer rests: a login queued behind others' on a busy relay is not closed as
        silent. `client_first`: the task waits for the client first (the message after 354,
        a TLS handshake), and the timer runs until it has what it waits for."""
        self._flush()
        if not client_first:
            self._idle.rest()
        self._busy = asyncio.get_running_loop().create_task(self._work(work))

    async def _work(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Runs `work`, then the input that came meanwhile. A cancellation (the client went
        away) ends it quietly: a task ended by an exception keeps its frames, and with them
        the session, in a cycle."""
        try:
            await work()
        except asyncio.CancelledError:
            self._busy = None
            return
        except Exception as error:
            self.reply(self.listener.handler.handle_exception(error))
        self._busy = None
        if not self._ended:
            if not self._closing:
                self._reset_timeout()  # the client's turn again
            self._process()

    # -- timers and stopping

    def _reset_timeout(self) -> None:
        gate = self.listener.gate
        stressed = gate.under_stress and self.agent is None
        self._idle.due_in(gate.busy_timeout if stressed else self.listener.timeout)

    def shorten_idle(self) -> None:
        """The gate is under stress: a session not logged in gets the shorter timeout."""
        if (
            self.agent is None
            and self.transport is not None
            and self._admitted is not None
            and self._idle.waiting  # not while the relay works for it
        ):
            self._reset_timeout()

    def _timed_out(self) -> None:
        """Say why before closing, so the client logs a reason and not a lost connection.
        A proxy that sent no header in time hears nothing: we do not speak SMTP before it."""
        if self.transport is None:
            return
        proxy = self.listener.proxy
        if self._awaiting_header and proxy is not None:
            log.info("%s: no PROXY header in %.0f s; closing", client_address(self), proxy.timeout)
            self.transport.close()
            return
        log.info("%s: silent too long; closing", client_address(self))
        self.reply(count(Reply.TIMEOUT.format(hostname=self.listener.hostname)))
        self.close()

    def close_for_stop(self, *, now: bool = False) -> None:
        """The relay stops: a session between messages hears 421 and is closed at once, one
        in the middle of a message once that is answered (`_take_message`), so a message
        being stored is not cut off before its 250; `now` closes either."""
        self._stopping = True
        if now or (self.mail_from is None and self._data is None):
            self._say_stopping()

    def _say_stopping(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._awaiting_header:
            transport.close()  # still waiting for the PROXY header: nobody to speak SMTP to
            return
        self.reply(count(Reply.STOPPING.format(hostname=self.listener.hostname)))
        self.close()

    # -- the PROXY header and TLS

    def _read_header(self) -> None:
        length = header_length(self._buffer)
        if length is None:
            return
        self._awaiting_header = False
        header = bytes(self._buffer[:length])
        del self._buffer[:length]
        if not self._admit_proxied(parse_header(header) if length else None):
            assert self.transport is not None
            self.transport.close()
            return
        if self.listener.implicit_tls is not None:
            self._reset_timeout()
            self._run(partial(self._implicit_tls, self.listener.implicit_tls), client_first=True)
            return
        self._greet()
        if self._buffer:
            self._process()

    def _admit_proxied(self, data: ProxyData | None) -> bool:
        """The client the header names passes the gate, or the connection ends. On an
        implicit-TLS listener the refusal is silent: the client expects a handshake."""
        gate = self.listener.gate
        proxy = client_address(self)
        client = proxied_client(data, self.peer) if data is not None else None
        if client is None:
            gate.refusals.warning(
                "proxy-header", "closed a connection from proxy %s: unusable PROXY header", proxy
            )
            return False
        refusal = gate.admit(client[0])
        if refusal is not None:
            count(refusal)
            if self.transport is not None and self.listener.implicit_tls is None:
                self.transport.write(refusal.encode("ascii") + b"\r\n")
            return False
        self._admitted = client[0]
        self.peer = client
        log.info("%s connected through proxy %s", client[0], proxy)
        gate.enter(self)
        return True

    async def _implicit_tls(self, context: ssl.SSLContext) -> None:
        """After the PROXY header the handshake comes first; octets the client sent right
        behind the header (its ClientHello) go to the TLS layer (tls_layer.py)."""
        assert self.transport is not None
        early = bytes(self._buffer)
        self._buffer.clear()
        try:
            self.transport = await tls_layer.secured(self.transport, self, context, early)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # The layer closes the socket but, no handshake done, may not call our
            # connection_lost: the session ends here, or the gate would count it forever.
            log.info("%s: TLS handshake failed: %s", client_address(self), exc)
            exc.__traceback__ = None  # its frames (the layer's waiter holds it) hold the session
            self._end()
            self._let_go()
            return
        self._greet()

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """STARTTLS: the session starts over on the TLS layer (RFC 3207 4.2). Plain text
        that came behind the command was thrown away up to here; from the first step of
        `loop.start_tls` on, which puts the layer in place before it waits, every octet
        goes to the handshake, never to the command reader."""
        transport = self.transport
        assert transport is not None
        self._buffer.clear()
        self._discarding = False
        try:
            secured = await asyncio.get_running_loop().start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", client_address(self), exc)
            exc.__traceback__ = None  # its frames (start_tls's waiter holds it) hold the session
            transport.close()
            self._end()
            return
        if secured is None or self._ended:
            return
        self.transport = secured
        self.host_name = ""
        self.extended_smtp = False
        self.agent = None
        self._reset_envelope()
        self._reset_timeout()

    # -- who the client is

    @property
    def tls(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    @property
    def authenticated(self) -> bool:
        return self.agent is not None

    def trusted_match(self) -> TrustedMatch | None:
        """The entry this client matches now (after STARTTLS it may match more). Every
        command asks; the certificate is read and checked once per address and TLS state."""
        if not self.listener.trusted or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        state = (client_address(self), ssl_object)
        if self._trusted_found is None or self._trusted_found[0] != state:
            certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            client = ClientFacts(state[0], ssl_object is not None, certificate)
            self._trusted_found = (state, trusted.match(self.listener.trusted, client))
        return self._trusted_found[1]

    def _starttls_needed(self) -> bool:
        """Commands before STARTTLS hear 530; a trusted client whose entry allows plain
        text is spared, every other client is not."""
        listener = self.listener
        if self.tls or listener.tls is None or not listener.require_tls:
            return False
        return self.trusted_match() is None

    def _helo_needed(self, helo: str = "HELO") -> bool:
        if self.host_name:
            return False
        self.reply(f"503 5.5.1 Error: send {helo} first")
        return True

    def _auth_needed(self) -> bool:
        """A client that matches a trusted entry needs no AUTH; every other hears 530."""
        if self.agent is not None or self.trusted_match() is not None:
            return False
        self.reply("530 5.7.0 Authentication required")
        return True

    def _reset_envelope(self) -> None:
        self.mail_from = None
        self.mail_options = []
        self.rcpt_tos = []
        self.rcpt_options = []
        self.rcpt_tried = False

    # -- the commands

    def _hello(self, arg: str | None, command: str) -> bool:
        """HELO or EHLO starts the session over under the client's name; False when none."""
        if not arg:
            self.reply(f"501 5.5.4 Syntax: {command} hostname")
            return False
        self._reset_envelope()
        self.extended_smtp = command == "EHLO"
        self.host_name = arg
        return True

    def smtp_HELO(self, arg: str | None) -> None:
        if self._hello(arg, "HELO"):
            self.reply(f"250 {self.listener.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if not self._hello(arg, "EHLO"):
            return
        self._out.append(self.listener.ehlo_reply[self.tls])

    def smtp_NOOP(self, arg: str | None) -> None:
        self.reply("250 2.0.0 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: QUIT")
            return
        self.reply("221 2.0.0 Bye")
        self.close()

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: RSET")
            return
        self._reset_envelope()
        self.reply("250 2.0.0 OK")

    def smtp_EXPN(self, arg: str | None) -> None:
        self.reply("502 5.5.1 EXPN not implemented")

    def smtp_VRFY(self, arg: str | None) -> None:
        if self._auth_needed():
            return
        if not arg:
            self.reply("501 5.5.4 Syntax: VRFY <address>")
        elif read_path(arg) is None:
            self.reply("502 5.5.4 Could not VRFY " + arg)
        else:
            self.reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, arg: str | None) -> None:
        if self._auth_needed():
            return
        offered = sorted(c for c in HELP_SYNTAX if c != "STARTTLS" or self.listener.tls)
        code = "214 2.0.0"
        if arg:
            command = arg.upper()
            if command in offered:
                extended = self.extended_smtp and command in ("MAIL", "RCPT")
                self.reply(
                    f"214 2.0.0 Syntax: {HELP_SYNTAX[command]}{EXTENDED_SYNTAX if extended else ''}"
                )
                return
            code = "501 5.5.4"
        self.reply(f"{code} Supported commands: {' '.join(offered)}")

    def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return
        context = self.listener.tls
        if context is None or self.tls:
            self.reply("454 4.7.0 TLS not available")
            return
        self.reply("220 2.0.0 Ready to start TLS")
        self._discarding = True
        self._run(partial(self._start_tls, context), client_first=True)

    def smtp_AUTH(self, arg: str | None) -> None:
        if self._helo_needed("EHLO"):
            return
        if not self.extended_smtp:
            self.reply("500 5.5.1 Error: command 'AUTH' not recognized")
        elif self.listener.require_tls and not self.tls:
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism")
        elif self.agent is not None:
            self.reply("503 5.5.1 Already authenticated")
        elif not arg or len(args := arg.split()) > 2:
            self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        elif args[0] not in MECHANISMS:
            self.reply("504 5.5.4 Unrecognized authentication type")
        else:
            self._run(partial(self.listener.handler.authenticate, self, args[0], args[1:]))

    async def challenge(self, challenge: str) -> bytes | None:
        """The client's answer to a 334 challenge, decoded; None when it gave up ("*"), sent
        no base64 or too long a line, which has been answered then."""
        self.reply("334 " + b64encode(challenge.encode()).decode("ascii"))
        line = await self.read_line()
        if line is None:
            self.reply("500 5.5.6 Authentication Exchange line is too long")  # RFC 4954 4
            return None
        answer = line.strip()
        if answer == b"*":
            self.reply("501 5.7.0 Auth aborted")
            return None
        try:
            return b64decode(answer, validate=True)
        except binascii.Error:
            self.reply("501 5.5.2 Can't decode base64")
            return None

    def smtp_MAIL(self, arg: str | None) -> None:
        if self._helo_needed() or self._auth_needed():
            return
        syntax = "501 5.5.4 Syntax: MAIL FROM: <address>" + (
            EXTENDED_SYNTAX if self.extended_smtp else ""
        )
        path = self._path(arg, "FROM:", syntax)
        if path is None:
            return
        address, rest = path
        if self.mail_from is not None:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        options = rest.upper().split()
        problem = mail_parameters_problem(options, self.listener.size_limit, syntax)
        if problem is not None:
            self.reply(problem)
            return
        if not address.isascii() and "SMTPUTF8" not in options:
            self.reply(Reply.NON_ASCII_ADDRESS)  # RFC 6531 3.7.4.1
            return
        handler = self.listener.handler
        if self.agent is not None:
            self.reply(handler.agent_sender(self, address, options))
        else:
            self._run(partial(handler.trusted_sender, self, address, options))

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._helo_needed() or self._auth_needed():
            return
        if self.mail_from is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        self.rcpt_tried = True
        syntax = "501 5.5.4 Syntax: RCPT TO: <address>" + (
            EXTENDED_SYNTAX if self.extended_smtp else ""
        )
        path = self._path(arg, "TO:", syntax)
        if path is None:
            return
        address, rest = path
        options = rest.upper().split()
        params = parameters(options)
        if params is None:
            self.reply(syntax)
        elif not address.isascii() and "SMTPUTF8" not in self.mail_options:
            self.reply(Reply.NON_ASCII_ADDRESS)
        elif params:
            self.reply("555 5.5.4 RCPT TO parameters not recognized or not implemented")
        else:
            self.reply(self.listener.handler.recipient(self, address, options))

    def _path(self, arg: str | None, keyword: str, syntax: str) -> tuple[str, str] | None:
        """MAIL's or RCPT's address and parameters, or None when the reply is given. MAIL's
        `<>` is the null reverse-path (RFC 5321 4.5.5) of an auto-reply, a DSN or a read
        receipt: its address is ""."""
        given = after_keyword(keyword, arg) if arg is not None else None
        if given is None:
            self.reply(syntax)
            return None
        path = read_path(given)
        if path is None:
            self.reply("553 5.1.3 Error: malformed address")
            return None
        if not path[0] or (path[1] and not self.extended_smtp):
            self.reply(syntax)
            return None
        if path[0] == "<>":
            if keyword == "TO:":
                self.reply(syntax)
                return None
            return "", path[1]
        return path

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed() or self._auth_needed():
            return
        if not self.rcpt_tos:
            # RFC 5321 3.3 allows either; the second tells a pipelining client why
            if self.rcpt_tried:
                self.reply("554 5.5.1 Error: no valid recipients")
            else:
                self.reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        listener = self.listener
        feed = DataFeed(listener.size_limit, DATA_LINE_LIMIT, listener.spool_dir)
        feed.drained = self._spool_caught_up
        self._data = feed
        self._run(partial(self._take_message, feed), client_first=True)

    async def _take_message(self, feed: DataFeed) -> None:
        spooled = await feed.spooled()
        self._resume()
        try:
            if spooled.too_big:
                reply = count(Reply.TOO_BIG.format(limit=self.listener.size_limit))
            elif spooled.line_too_long:
                reply = count(Reply.LINE_TOO_LONG)
            elif spooled.failed is not None:
                log.error("%s: cannot spool a message: %s", client_address(self), spooled.failed)
                reply = count(Reply.TEMPORARY)
            else:
                reply = await self._hand_over(spooled)
        finally:
            spooled.close()
            self._reset_envelope()  # DATA ends the transaction, whatever its answer
        self.reply(reply)
        if self._stopping:
            self._say_stopping()

    async def _hand_over(self, spooled: Spooled) -> str:
        """The message to the handler, in memory only while the budget holds its size."""
        assert self.mail_from is not None
        budget = self.listener.data_budget or ByteBudget(spooled.size)
        async with budget.holding(spooled.size):
            raw = await spooled.read()
            self.received = Received(spooled.hashed_file(), spooled.bare_line_end)
            try:
                return await self.listener.handler.handle_DATA(self, raw)
            finally:
                self.received = None


def _commands_of(
    cls: type[SubmissionSMTP],
) -> dict[str, Callable[[SubmissionSMTP, str | None], None]]:
    return {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}


SubmissionSMTP.COMMANDS = _commands_of(SubmissionSMTP)
