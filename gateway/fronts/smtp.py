"""The submission front: agents' mail clients speak SMTP to aiosmtpd, which hands over here.

A thin handler: each hook checks its input and turns it into a pipeline call, answering from
one table of replies. 250 is only given once the pipeline has made the message durable.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import ssl
from asyncio import sslproto
from base64 import b64decode
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax
from cryptography.hazmat.primitives.serialization import Encoding
from email_validator import EmailNotValidError, validate_email
from sqlalchemy.exc import SQLAlchemyError

from gateway import users
from gateway.config import Settings
from gateway.fronts import trusted
from gateway.fronts.byte_budget import ByteBudget
from gateway.fronts.client_address import client_address
from gateway.fronts.command_tables import BARE_HANDLER, CommandTables
from gateway.fronts.data_reader import Spooled, spool_data
from gateway.fronts.listen_addresses import plaintext_logins_allowed, split_address
from gateway.fronts.proxy_header import ProxyPolicy, proxied_client
from gateway.fronts.smtp_guard import ConnectionGate, Refusal, ThrottledLog, session_ceiling
from gateway.fronts.smtp_paths import plain_path
from gateway.fronts.trusted import ClientFacts, TrustedEntry, TrustedMatch
from gateway.intake.pipeline import Envelope as PipelineEnvelope
from gateway.intake.pipeline import Origin, Pipeline, Received, Submitter, TrustedOrigin
from gateway.login_throttle import LoginThrottle
from gateway.rejections import Rejected
from gateway.store.blobs import StoreUnavailable
from gateway.store.db import Database
from gateway.store.health import BlobHealth
from gateway.store.metrics import SMTP_REPLIES
from gateway.watchdog import Watchdog

log = logging.getLogger(__name__)
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds an implicit-TLS client may take to say hello
STOP_GRACE = 30.0  # seconds a message under way may take to be answered when the relay stops


class _AiosmtpdNoise(logging.Filter):
    """aiosmtpd warns on every successful login that `Session.login_data` (which it sets
    itself, and which we never read) is deprecated, and on every connection when
    smtp.proxy_timeout is below 3 s, a choice the operator made once."""

    NOISE = (
        "Session.login_data is deprecated",
        "proxy_protocol_timeout < 3.0",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


logging.getLogger("mail.log").addFilter(_AiosmtpdNoise())


class Reply:
    """Every reply the handler gives, in one place."""

    OK = "250 2.1.0 Ok"
    RCPT_OK = "250 2.1.5 Ok"
    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_FAILED = "535 5.7.8 Authentication failed: wrong login or password"
    AUTH_THROTTLED = "454 4.7.0 Too many failed logins from your address; try again later"
    AUTH_ACCOUNT_THROTTLED = "454 4.7.0 Too many failed logins for this account; try again later"
    AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure; try again later"
    AUTH_TOO_MANY = "421 4.7.0 Too many failed logins; closing the connection"
    AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the base64 answer"
    AUTH_BAD_PLAIN = "501 5.5.2 AUTH PLAIN needs authzid NUL login NUL password"
    TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients; at most {limit} per message"
    TOO_BIG = "552 5.3.4 The message is too big; at most {limit} bytes are accepted"
    LINE_TOO_LONG = "500 5.5.6 Line too long; at most 1000 octets per line (RFC 5321 4.5.3.1.6)"
    TEMPORARY = "451 4.3.0 The message was not accepted because of a local problem; try again"
    LOCAL_ERROR = "451 4.3.0 A local problem; try again later"
    STORE_UNAVAILABLE = "451 4.3.0 The message store is unavailable for the moment; try again"
    QUEUED = "250 2.0.0 Ok: queued as {message_id}"
    TIMEOUT = "421 4.4.2 {hostname} Timeout: the client was silent too long; closing"
    STOPPING = "421 4.3.2 {hostname} The relay is stopping; try again in a moment"

    @staticmethod
    def bad_sender(address: str, why: str) -> str:
        return f"553 5.1.7 The sender address <{address}> is not valid: {why}"

    @staticmethod
    def not_your_address(address: str) -> str:
        return f"553 5.7.1 You may not send as <{address}>: it is not one of your addresses"

    @staticmethod
    def not_our_domain(address: str, where: str) -> str:
        return trusted.not_our_domain(address, where)

    @staticmethod
    def bad_recipient(address: str, why: str) -> str:
        return f"553 5.1.3 The recipient address <{address}> is not valid: {why}"


class SubmissionHandler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        pipeline: Pipeline,
        throttle: LoginThrottle,
        store: BlobHealth | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.throttle = throttle
        self.store = store
        self.failed_logins = throttle.per_address
        self.served = trusted.ServedDomains(settings, db)
        self._auth_failures: WeakKeyDictionary[Session, int] = WeakKeyDictionary()
        self._throttled = ThrottledLog(log)

    # -- AUTH: our own PLAIN and LOGIN so that argon2 runs off the event loop.

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if self._over_budget(server):
            return await self._failed(server, Reply.AUTH_THROTTLED)
        answer = await _initial_or_challenge(server, args, "")
        if answer is None:
            return AuthResult(success=False, handled=True)
        parts = answer.split(b"\x00")
        if len(parts) != 3:
            return await _refuse(server, Reply.AUTH_BAD_PLAIN)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if self._over_budget(server):
            return await self._failed(server, Reply.AUTH_THROTTLED)
        login = await _initial_or_challenge(server, args, server.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):  # "*" or not base64: aiosmtpd has replied
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        assert session is not None
        address = client_address(session)
        account = login.decode("utf-8", errors="replace")
        try:
            await self.throttle.wait_turn(address, account)
        except TimeoutError:
            return await _refuse(server, Reply.AUTH_TEMPORARY)
        if self.throttle.address_refused(address):
            self._throttled.warning(
                "auth", "refused a login from %s: too many failed logins from there", address
            )
            return await self._failed(server, Reply.AUTH_THROTTLED)
        if self.throttle.account_refused(address, account):
            self._throttled.warning(
                "account", "refused a login from %s: too many failed logins for it", address
            )
            return await self._failed(server, Reply.AUTH_ACCOUNT_THROTTLED)
        try:
            with self.throttle.checking(address, account):
                agent = await users.authenticate(
                    self.db,
                    account,
                    password.decode("utf-8", errors="replace"),
                    priority=self.throttle.priority(address),
                )
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.error("%s: cannot check the login, no database: %s", address, exc)
            return await _refuse(server, Reply.AUTH_TEMPORARY)
        if agent is not None:
            self.throttle.succeeded(address)
            log.info("%s authenticated as %s", address, agent.email)
            return AuthResult(success=True, auth_data=agent, message=Reply.AUTH_OK)
        self.throttle.failed(address, account)
        shown = login[:100].decode("utf-8", errors="replace")
        log.warning("failed login %r from %s", shown, address)
        return await self._failed(server, Reply.AUTH_FAILED)

    def _over_budget(self, server: SMTP) -> bool:
        """An address over its failed-login budget is refused before a password is read."""
        address = _peer_of(server)
        if not self.failed_logins.over_budget(address):
            return False
        self._throttled.warning(
            "auth", "refused a login from %s: too many failed logins from there", address
        )
        return True

    async def _failed(self, server: SMTP, reply: str) -> AuthResult:
        """A refused login; the session's own count closes it after max_auth_failures."""
        session = server.session
        assert session is not None
        failures = self._auth_failures.get(session, 0) + 1
        self._auth_failures[session] = failures
        if failures >= self.settings.smtp.max_auth_failures:
            await _refuse(server, Reply.AUTH_TOO_MANY)
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        # AuthResult's handled defaults to True, which would make aiosmtpd send nothing.
        return await _refuse(server, reply)

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy_data: ProxyData
    ) -> bool:
        """aiosmtpd has read the PROXY header; False closes the connection."""
        return isinstance(server, SubmissionSMTP) and await server.admit_proxied(proxy_data)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's default answers `500 Error: (Class) text`, showing the client our
        internals (database addresses, paths) and telling it not to retry."""
        if isinstance(error, ssl.SSLError):  # e.g. a client certificate from an unknown CA
            log.info("SMTP session ended: TLS failed: %s", error)
            return _count(Reply.LOCAL_ERROR)
        log.error("SMTP session failed", exc_info=error)
        return _count(Reply.LOCAL_ERROR)

    # -- the envelope

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        problem = address_problem(address)
        if problem is not None:
            return _count(Reply.bad_sender(address, problem))
        if self.store is not None and not self.store.available:
            return _count(Reply.STORE_UNAVAILABLE)  # before the client sends its data
        if not session.authenticated:
            found = _trusted_match(server)
            domains = await self.served.allowed(found, address)
            assert isinstance(server, SubmissionSMTP)  # _trusted_match found an entry
            server.sender_domains = domains
            if trusted.domain_of(address) not in domains:
                log.info(
                    "%s (%s): refused sender %s", client_address(session), found.entry.name, address
                )
                return _count(Reply.not_our_domain(address, "MAIL FROM"))
        elif not _agent(session).may_send_as(address):
            return _count(Reply.not_your_address(address))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply.OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        limit = self.settings.smtp.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return _count(Reply.TOO_MANY_RECIPIENTS.format(limit=limit))
        problem = address_problem(address)
        if problem is not None:
            return _count(Reply.bad_recipient(address, problem))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply.RCPT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        assert raw is not None and envelope.mail_from is not None
        tls = server.transport is not None and (
            server.transport.get_extra_info("ssl_object") is not None
        )
        origin = Origin(
            helo=session.host_name or "",
            peer=client_address(session),
            protocol="ESMTPSA" if tls else "ESMTPA",
        )
        submitter: Submitter
        try:
            if session.authenticated:
                submitter = _agent(session)
            else:
                found = _trusted_match(server)
                assert isinstance(server, SubmissionSMTP)
                submitter = await trusted.submitter_of_message(
                    found, server.sender_domains, self.db, envelope.mail_from, raw
                )
                origin = Origin(
                    helo=origin.helo,
                    peer=origin.peer,
                    protocol="ESMTPS" if tls else "ESMTP",
                    trusted=TrustedOrigin(
                        found.entry.name, found.entry.settings.service_name, found.certificate_name
                    ),
                )
            message_id = await self.pipeline.submit(
                PipelineEnvelope(envelope.mail_from, tuple(envelope.rcpt_tos)),
                raw,
                submitter,
                origin,
                received=server.received if isinstance(server, SubmissionSMTP) else None,
            )
        except Rejected as refusal:
            log.info("refused mail from %s: %s", envelope.mail_from, refusal.reply)
            return _count(refusal.reply)
        except StoreUnavailable as exc:
            log.warning(
                "deferred mail from %s, blob store unavailable: %s", envelope.mail_from, exc
            )
            return _count(Reply.STORE_UNAVAILABLE)  # the store told BlobHealth itself
        except Exception:
            log.exception("could not accept mail from %s", envelope.mail_from)
            return _count(Reply.TEMPORARY)
        return _count(Reply.QUEUED.format(message_id=message_id))


@functools.lru_cache(maxsize=4096)
def address_problem(address: str) -> str | None:
    """Why `address` is no valid mailbox for MAIL or RCPT, or None. The check reads only the
    text (no DNS), so its answer is kept: each message names the same sender, and often the
    same recipients, and the check costs about 65 us."""
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


class SubmissionSMTP(CommandTables, SMTP):
    """aiosmtpd's protocol with DATA read in large pieces (gateway/fronts/data_reader.py).

    `timeout` means client silence, as Postfix's smtpd_timeout does: aiosmtpd restarts its
    timer only per command, so a DATA transfer longer than the timeout was cut however
    steadily it flowed. Here every piece of DATA restarts it, and the timer stands still
    while the relay itself works on the message (the client is waiting for us then).
    Each connection first passes the front's gate (gateway/fronts/smtp_guard.py), or hears 421.
    Behind HAProxy (`proxy`), the gate waits for the PROXY header and counts the client it
    names, never the proxy; the session's peer becomes that client (client_address.py).
    """

    _receiving_data = False
    _stopping = False
    _require_starttls = False
    trusted: tuple[TrustedEntry, ...] = ()
    spool_dir: Path | None = None  # where DATA is spooled; the system's temp directory if None
    data_budget: ByteBudget | None = None  # received messages in memory at once; None: no bound
    received: Received | None = None  # what the spool learned of the message in the DATA hook

    def __init__(
        self,
        handler: SubmissionHandler,
        gate: ConnectionGate,
        proxy: ProxyPolicy | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        trusted: tuple[TrustedEntry, ...] = (),
        **kwargs: Any,
    ) -> None:
        """`implicit_tls`: an implicit-TLS listener behind a proxy, whose handshake follows
        the PROXY header (without a proxy, the listening socket itself does TLS)."""
        if proxy is not None:
            kwargs["proxy_protocol_timeout"] = proxy.timeout
        # aiosmtpd warns and logs on every connection where AUTH is required without
        # STARTTLS: here the implicit-TLS and loopback listeners, by the front's policy
        # (plaintext_logins_allowed). The requirement is set after that check.
        auth_required = kwargs.pop("auth_required", False)
        super().__init__(BARE_HANDLER, **kwargs)  # the tables come from set_tables
        self.set_tables(handler, kwargs.get("auth_exclude_mechanism") or ())
        self._auth_required = auth_required
        self._gate = gate
        self._proxy = proxy
        self._implicit_tls = implicit_tls
        self._started = False
        self.trusted = trusted
        self._trusted_found: tuple[tuple[str, object], TrustedMatch | None] | None = None
        # the domains a trusted client may send for, as MAIL found them for this transaction
        self.sender_domains: frozenset[str] = frozenset()
        self._admitted: str | None = None  # the client address while counted by the gate
        self._client: Any = None  # (address, port) the PROXY header named
        self._proxy_data: ProxyData | None = None
        self._refused = False
        self.closed = asyncio.Event()
        self._held_lines: list[bytes] = []
        self._idle = Watchdog(self.loop, self._timeout_cb)

    async def push(self, status: str | bytes) -> None:
        """A reply's lines before its last ("250-SIZE ...") wait to leave with it: aiosmtpd
        writes each EHLO line on its own, a send and a wake-up of the client per extension
        on every connection."""
        line = (
            status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
            if isinstance(status, str)
            else status
        )
        if line[line.rfind(b"\n") + 1 :][3:4] == b"-":  # its last line is not the reply's
            self._held_lines.append(line)
            return
        if self._held_lines:
            line = b"\r\n".join([*self._held_lines, line])
            self._held_lines.clear()
        await super().push(line)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of a MAIL or RCPT path, a plain `<local@domain>` read quickly
        (gateway/fronts/smtp_paths.py)."""
        plain = plain_path(arg)
        if plain is None:
            return super()._getaddr(arg)
        address, rest = plain
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The gate decides before aiosmtpd sets up a session (STARTTLS calls this again)."""
        if self._started:
            super().connection_made(transport)
            if self._client is not None and self.session is not None:
                self.session.peer = self._client
                self.session.proxy_data = self._proxy_data
            return
        self._started = True
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
        if self._proxy is not None:
            self._await_proxy_header(transport, address)
            return
        refusal = self._gate.admit(address)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._admitted = address
        super().connection_made(transport)
        self._gate.enter(self)

    def _await_proxy_header(self, transport: asyncio.BaseTransport, address: str) -> None:
        """Only a configured proxy may connect; aiosmtpd then reads its header before the
        greeting, within the proxy timeout, and calls handle_PROXY (admit_proxied)."""
        assert self._proxy is not None
        if not self._proxy.trusted(address):
            self._gate.refusals.warning(
                "not-a-proxy", "closed a connection from %s: not in smtp.proxy_from", address
            )
            self._refuse(transport, None)
            return
        if self._gate.open_total >= self._gate.total:
            self._refuse(transport, Refusal.BUSY)
            return
        super().connection_made(transport)
        self._gate.sessions.add(self)  # so that stopping the relay closes it too

    async def admit_proxied(self, data: ProxyData) -> bool:
        """The header is read: the client it names passes the gate, or the connection ends.

        On an implicit-TLS listener the refusal is silent (the client expects a TLS
        handshake, not text) and the handshake happens here, before the greeting."""
        session = self.session
        assert session is not None
        proxy = client_address(session)
        client = proxied_client(data, session.peer)
        if client is None:
            self._gate.refusals.warning(
                "proxy-header", "closed a connection from proxy %s: unusable PROXY header", proxy
            )
            return False
        refusal = self._gate.admit(client[0])
        if refusal is not None:
            _count(refusal)
            if (writable := _writable(self.transport)) is not None and self._implicit_tls is None:
                writable.write(refusal.encode("ascii") + b"\r\n")
            return False
        self._admitted = client[0]
        self._client = client
        session.peer = client  # type: ignore[assignment]  # aiosmtpd stores the peername tuple
        self._proxy_data = data
        log.info("%s connected through proxy %s", client[0], proxy)
        self._gate.enter(self)
        if self._implicit_tls is not None:
            return await self._start_implicit_tls(self._implicit_tls)
        return True

    async def _start_implicit_tls(self, context: ssl.SSLContext) -> bool:
        """What aiosmtpd's STARTTLS does, without the command: the TLS layer goes between
        the socket and this protocol, which sees connection_made again once it is up.
        Bytes the client sent right behind the header (its ClientHello, often in the same
        packet) are already in the reader; they are handed to the TLS layer, not lost."""
        assert self.transport is not None
        early = bytes(self._reader._buffer)  # type: ignore[attr-defined]
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        waiter = self.loop.create_future()
        tls = sslproto.SSLProtocol(
            self.loop,
            self,
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=int(TLS_HANDSHAKE_TIMEOUT),
        )
        self._tls_protocol = tls
        self._original_transport = self.transport
        self._original_transport.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(self._original_transport)
        if early:
            _feed(tls, early)
        try:
            await waiter
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # The TLS layer closes the socket but, the handshake never done, does not call
            # our connection_lost: the session ends here, or the gate would count it forever.
            log.info("%s: TLS handshake failed: %s", _peer_of(self), exc)
            self._leave_gate()
            return False
        return True

    def _refuse(self, transport: asyncio.BaseTransport, refusal: str | None) -> None:
        self._refused = True
        if refusal is not None and (writable := _writable(transport)) is not None:
            writable.write(refusal.encode("ascii") + b"\r\n")
            _count(refusal)
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            self._let_go()
            return
        try:
            super().connection_lost(error)
        finally:
            self._leave_gate()
            task = self._handler_coroutine
            if task is None or task.done():
                self._let_go()
            else:  # cancelled just now by aiosmtpd: it unwinds on a later turn of the loop
                task.add_done_callback(self._handler_ended)

    def _handler_ended(self, task: asyncio.Task[None]) -> None:
        self._let_go()

    def _let_go(self) -> None:
        """The connection is gone and nothing of the session runs any more: drop what refers
        back to it, so that it is freed at once and not by the cyclic garbage collector.

        Each session was about 50 objects in reference cycles (its table of bound commands,
        the stream reader and writer, the watchdog's callback, the handler task ended by an
        exception whose traceback holds the task's frames); the collector found them only in
        its full passes, which stopped the loop for 7-8 ms about every 1.4 s under load
        (bench/README.md).
        """
        self._smtp_methods = {}
        self._client_connected_cb = None
        self._reader = self._writer = None  # type: ignore[assignment]  # the session is over
        self._handler_coroutine = None
        self._idle.close()

    def _leave_gate(self) -> None:
        self._idle.stop()
        self.closed.set()
        if self._admitted is not None:
            self._gate.release(self._admitted, self)
            self._admitted = None
        self._gate.sessions.discard(self)

    def eof_received(self) -> bool | None:
        """Close at the client's EOF: aiosmtpd has cancelled the session's handler, so
        nothing more will be written, and a half-open connection would hold its place at
        the gate until the idle timeout (uvloop keeps it open where asyncio's write to the
        closed peer happened to end it)."""
        if not self._refused:
            super().eof_received()
        return False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The session's silence is watched by a Watchdog: aiosmtpd sets a timer for every
        command, and this front would for every piece of DATA."""
        if duration is None:
            stressed = self._gate.under_stress and not self._logged_in
            duration = self._gate.busy_timeout if stressed else self._timeout_duration
        self._idle.due_in(duration)
        if self._idle.timer is not None:
            self._timeout_handle = self._idle.timer  # aiosmtpd's connection_lost cancels it

    def close_for_stop(self, *, now: bool = False) -> None:
        """The relay stops: a session between messages hears 421 and is closed at once, one
        in the middle of a message once that is answered (smtp_DATA), so a message being
        stored is not cut off before its 250; `now` closes either."""
        self._stopping = True
        idle = self.envelope is None or not self.envelope.mail_from
        if now or (idle and not self._receiving_data):
            self._say_stopping()

    def _say_stopping(self) -> None:
        transport = self.transport
        if self._proxy is not None and self._admitted is None and transport is not None:
            transport.close()  # still waiting for the PROXY header: nobody to speak SMTP to
        elif (writable := _writable(transport)) is not None:
            reply = _count(Reply.STOPPING.format(hostname=self.hostname))
            writable.write((reply + "\r\n").encode("ascii"))
            writable.close()

    async def check_auth_needed(self, caller_method: str) -> bool:
        """A client that matches a trusted entry needs no AUTH; every other hears 530."""
        if self.session is not None and not self.session.authenticated and self.trusted_match():
            return False
        result: bool = await super().check_auth_needed(caller_method)
        return result

    @property
    def require_starttls(self) -> bool:
        """aiosmtpd answers 530 to commands before STARTTLS when this holds; a trusted
        client whose entry allows plain text is spared, every other client is not."""
        if not self._require_starttls or self._tls_protocol is not None:
            return self._require_starttls
        return self.trusted_match() is None

    @require_starttls.setter
    def require_starttls(self, value: bool) -> None:
        self._require_starttls = bool(value)

    def trusted_match(self) -> TrustedMatch | None:
        """The entry this client matches now (after STARTTLS it may match more). Every
        command asks; the certificate is read and checked once per address and TLS state."""
        if not self.trusted or self.session is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        state = (client_address(self.session), ssl_object)
        if self._trusted_found is None or self._trusted_found[0] != state:
            certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            client = ClientFacts(state[0], ssl_object is not None, certificate)
            self._trusted_found = (state, trusted.match(self.trusted, client))
        return self._trusted_found[1]

    def shorten_idle(self) -> None:
        if not self._logged_in and self.transport is not None and self._admitted is not None:
            self._reset_timeout()

    @property
    def _logged_in(self) -> bool:
        return self.session is not None and bool(self.session.authenticated)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._receiving_data:
            self._reset_timeout()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        """Say why before closing, so the client logs a reason and not a lost connection.

        A proxy that sent no header in time hears nothing: we do not speak SMTP before it."""
        transport = self.transport
        if self._proxy is not None and self._admitted is None:
            log.info("%s: no PROXY header in %.0f s; closing", _peer_of(self), self._proxy.timeout)
        elif (writable := _writable(transport)) is not None:
            log.info("%s: silent too long; closing", _peer_of(self))
            writable.write((Reply.TIMEOUT.format(hostname=self.hostname) + "\r\n").encode("ascii"))
            _count(Reply.TIMEOUT)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _spool_data(self) -> Spooled:
        self._receiving_data = True
        try:
            return await spool_data(
                self._reader, self.data_size_limit, self.line_length_limit, self.spool_dir
            )
        finally:
            self._receiving_data = False
            self._pause_timeout()

    def _pause_timeout(self) -> None:
        self._idle.rest()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spooled = await self._spool_data()
        try:
            if spooled.too_big:
                reply = _count(Reply.TOO_BIG.format(limit=self.data_size_limit))
            elif spooled.line_too_long:
                reply = _count(Reply.LINE_TOO_LONG)
            else:
                reply = await self._hand_over(spooled)
        finally:
            spooled.close()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)
        if self._stopping:
            self._say_stopping()
            return
        self._reset_timeout()

    async def _hand_over(self, spooled: Spooled) -> str:
        """The message to the handler, in memory only while the budget holds its size; the
        envelope lets go of it before the budget does."""
        assert self.envelope is not None
        budget = self.data_budget or ByteBudget(spooled.size)
        async with budget.holding(spooled.size):
            self.envelope.content = self.envelope.original_content = await spooled.read()
            self.received = Received(spooled.hashed_file(), spooled.bare_line_end)
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self.envelope.content = self.envelope.original_content = None
                self.received = None
        return "250 OK" if status is MISSING else str(status)


class SmtpFront:
    """The listeners: plain ones with STARTTLS, implicit-TLS ones (port 465 style)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        pipeline: Pipeline,
        throttle: LoginThrottle | None = None,
        store: BlobHealth | None = None,
    ) -> None:
        """`throttle` is shared with the console's sign-in; a front of its own gets its own.
        `store`: while it says the blob store is unavailable, MAIL FROM hears 451."""
        self.settings = settings
        smtp = settings.smtp
        self.throttle = throttle or LoginThrottle.from_settings(smtp)
        self.failed_logins = self.throttle.per_address
        self.handler = SubmissionHandler(settings, db, pipeline, self.throttle, store)
        self.gate = ConnectionGate(smtp, self.failed_logins, smtp.max_connections)
        self.proxy = ProxyPolicy.from_settings(smtp)
        self.trusted = tuple(TrustedEntry.load(entry) for entry in smtp.trusted)
        self.tls = tls_context(settings)
        self.spool_dir = spool_directory(settings)
        self.data_budget = ByteBudget(smtp.data_in_memory)
        self.servers: list[asyncio.Server] = []

    async def start(self, *, reuse_port: bool = False) -> None:
        """Listen on every address; `reuse_port` (SO_REUSEPORT) lets the processes of
        `serve --processes N` listen on the same ones."""
        loop = asyncio.get_running_loop()
        smtp = self.settings.smtp
        self.gate.total = session_ceiling(smtp.max_connections)
        await asyncio.to_thread(self.spool_dir.mkdir, parents=True, exist_ok=True)
        for address in smtp.listen:
            host, port = split_address(address)
            plaintext_ok = plaintext_logins_allowed(smtp, host)
            if self.tls is None and not plaintext_ok:
                raise RuntimeError(
                    f"smtp.listen {address}: agents could not log in; set smtp.tls_cert and"
                    " smtp.tls_key, or allow_plaintext_auth_on_loopback on a loopback address"
                )
            entries = self._trusted_on(address)
            factory = self._factory(self._tls_for(entries), not plaintext_ok, entries)
            self.servers.append(
                await loop.create_server(factory, host, port, reuse_port=reuse_port)
            )
        for address in self._trusted_listeners():
            host, port = split_address(address)
            require_tls = not plaintext_logins_allowed(smtp, host)
            entries = self._trusted_on(address)
            factory = self._factory(self._tls_for(entries), require_tls, entries)
            self.servers.append(
                await loop.create_server(factory, host, port, reuse_port=reuse_port)
            )
        for address in smtp.implicit_tls_listen:
            host, port = split_address(address)
            entries = self._trusted_on(address)
            if self.proxy is not None:
                factory = self._factory(None, False, entries, implicit_tls=self._tls_for(entries))
                self.servers.append(
                    await loop.create_server(factory, host, port, reuse_port=reuse_port)
                )
                continue
            factory = self._factory(None, False, entries)
            self.servers.append(
                await loop.create_server(
                    factory,
                    host,
                    port,
                    ssl=self._tls_for(entries),
                    ssl_handshake_timeout=min(smtp.timeout, TLS_HANDSHAKE_TIMEOUT),
                    reuse_port=reuse_port,
                )
            )
        for server in self.servers:
            for sock in server.sockets:
                log.info("SMTP listening on %s", sock.getsockname()[:2])

    def _tls_for(self, entries: tuple[TrustedEntry, ...]) -> ssl.SSLContext | None:
        """A listener asks for client certificates only where an entry on it names some."""
        if not any(entry.authorities for entry in entries):
            return self.tls
        return tls_context(self.settings, entries)

    def _trusted_on(self, address: str) -> tuple[TrustedEntry, ...]:
        """Entries without listeners of their own match on the shared ones."""
        return tuple(
            e for e in self.trusted if address in e.settings.listen or not e.settings.listen
        )

    def _trusted_listeners(self) -> list[str]:
        """Trusted entries' own listen addresses (STARTTLS when TLS is configured)."""
        shared = {*self.settings.smtp.listen, *self.settings.smtp.implicit_tls_listen}
        own = [a for e in self.trusted for a in e.settings.listen if a not in shared]
        return list(dict.fromkeys(own))

    def _factory(
        self,
        tls: ssl.SSLContext | None,
        require_tls: bool,
        trusted_entries: tuple[TrustedEntry, ...],
        implicit_tls: ssl.SSLContext | None = None,
    ) -> Any:
        smtp = self.settings.smtp

        loop = asyncio.get_running_loop()

        def make() -> SMTP:
            session = SubmissionSMTP(
                self.handler,
                self.gate,
                self.proxy,
                implicit_tls,
                trusted_entries,
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=False,
                decode_data=False,
                hostname=self.settings.server.hostname,
                ident="sealrelay",
                tls_context=tls,
                require_starttls=tls is not None and require_tls,
                timeout=smtp.timeout,
                loop=loop,
                auth_required=True,
                auth_require_tls=require_tls,
            )
            session.spool_dir = self.spool_dir
            session.data_budget = self.data_budget
            return session

        return make

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for server in self.servers for sock in server.sockets]

    async def stop(self) -> None:
        """Take no more connections and end the sessions (SubmissionSMTP.close_for_stop):
        a message under way gets up to STOP_GRACE seconds to be answered; one cut off
        gets no 250, so the agent's client sends it again."""
        for server in self.servers:
            server.close()
        sessions = [s for s in self.gate.sessions if isinstance(s, SubmissionSMTP)]
        for session in sessions:
            session.close_for_stop()
        waits = [asyncio.create_task(s.closed.wait()) for s in sessions]
        if waits:
            grace = min(STOP_GRACE, self.settings.smtp.timeout)
            _, pending = await asyncio.wait(waits, timeout=grace)
            for wait in pending:
                wait.cancel()
        for session in sessions:
            session.close_for_stop(now=True)
        for server in self.servers:
            await server.wait_closed()
        self.servers = []


def spool_directory(settings: Settings) -> Path:
    """`smtp.spool_dir`, or spool/ beside the blob store directory (on the same disk as the
    blobs, not in a temp directory that may be memory, tmpfs)."""
    return settings.smtp.spool_dir or settings.storage.path.parent / "spool"


def tls_context(
    settings: Settings, trusted_entries: tuple[TrustedEntry, ...] = ()
) -> ssl.SSLContext | None:
    """The listeners' TLS; with trusted entries' client CAs it asks for (never requires) a
    client certificate, verified against those CAs only, so agents without one connect."""
    smtp = settings.smtp
    if smtp.tls_cert is None or smtp.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(smtp.tls_cert, smtp.tls_key)
    authorities = [a for entry in trusted_entries for a in entry.authorities]
    if authorities:
        context.load_verify_locations(
            cadata="".join(a.public_bytes(Encoding.PEM).decode("ascii") for a in authorities)
        )
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _trusted_match(server: SMTP) -> TrustedMatch:
    """The trusted entry of a session that did not log in; aiosmtpd let it past AUTH
    (SubmissionSMTP.check_auth_needed) only because there is one."""
    found = server.trusted_match() if isinstance(server, SubmissionSMTP) else None
    if found is None:
        raise RuntimeError("MAIL without AUTH from a client that matches no trusted entry")
    return found


def _agent(session: Session) -> users.Agent:
    agent = session.auth_data
    if not isinstance(agent, users.Agent):
        raise RuntimeError("MAIL without an authenticated agent: aiosmtpd must require AUTH")
    return agent


async def _initial_or_challenge(server: SMTP, args: list[str], challenge: str) -> bytes | None:
    """The client's first answer, inline (`AUTH PLAIN xyz`) or after a 334 challenge.

    None when it was cancelled or not base64; the reply has been given then.
    """
    if len(args) > 1:
        answer = _b64(args[1])
        if answer is None:
            await _refuse(server, Reply.AUTH_BAD_BASE64)
        return answer
    challenged = await server.challenge_auth(challenge)
    # On "*" or an answer that is not base64, challenge_auth has given the 501 itself;
    # a second reply here would answer the client's next command out of turn.
    return challenged if isinstance(challenged, bytes) else None


async def _refuse(server: SMTP, reply: str) -> AuthResult:
    await server.push(_count(reply))
    return AuthResult(success=False, handled=True)


def _writable(transport: asyncio.BaseTransport | None) -> asyncio.WriteTransport | None:
    """`transport` when a reply can still be written to it. By what it can do, not its
    class: uvloop's transports do not derive from asyncio.WriteTransport."""
    if transport is None or transport.is_closing() or not hasattr(transport, "write"):
        return None
    return cast(asyncio.WriteTransport, transport)


def _count(reply: str) -> str:
    SMTP_REPLIES.labels(code=reply[:3]).inc()
    return reply


def _b64(value: str) -> bytes | None:
    try:
        return b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _peer_of(server: SMTP) -> str:
    return client_address(server.session) if server.session is not None else "?"
