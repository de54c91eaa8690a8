"""The submission front: agents' mail clients speak SMTP to our own protocol
(gateway/fronts/smtp_protocol.py), which asks here what to answer.

A thin handler: each check turns its input into a reply or a pipeline call, answering from
one table of replies (gateway/fronts/smtp_replies.py). 250 is only given once the pipeline
has made the message durable.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import ssl
from base64 import b64decode
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding
from email_validator import EmailNotValidError, validate_email
from sqlalchemy.exc import SQLAlchemyError

from gateway import users
from gateway.config import Settings
from gateway.fronts import trusted
from gateway.fronts.byte_budget import ByteBudget
from gateway.fronts.client_address import client_address
from gateway.fronts.listen_addresses import (
    logins_needed,
    plaintext_logins_allowed,
    split_address,
)
from gateway.fronts.proxy_header import ProxyPolicy
from gateway.fronts.smtp_guard import ConnectionGate, ThrottledLog, session_ceiling
from gateway.fronts.smtp_protocol import TLS_HANDSHAKE_TIMEOUT, Listener, SubmissionSMTP
from gateway.fronts.smtp_replies import Reply, count
from gateway.fronts.trusted import TrustedEntry, TrustedMatch
from gateway.intake.pipeline import Envelope as PipelineEnvelope
from gateway.intake.pipeline import Origin, Pipeline, Submitter, TrustedOrigin, may_use_sender
from gateway.login_throttle import LoginThrottle
from gateway.rejections import Rejected
from gateway.store.blobs import StoreUnavailable
from gateway.store.db import Database
from gateway.store.health import BlobHealth

__all__ = ["Reply", "SmtpFront", "SubmissionHandler", "SubmissionSMTP", "address_problem"]

log = logging.getLogger(__name__)
STOP_GRACE = 30.0  # seconds a message under way may take to be answered when the relay stops
LOGIN_CHALLENGE = "User Name\x00"  # AUTH LOGIN's challenges, as aiosmtpd words them
PASSWORD_CHALLENGE = "Password\x00"  # noqa: S105  # the prompt, no password


class SubmissionHandler:
    """What the session asks: may this sender, this recipient, this login, this message."""

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
        self._throttled = ThrottledLog(log)

    # -- AUTH: our own PLAIN and LOGIN, so that argon2 runs off the event loop.

    async def authenticate(self, session: SubmissionSMTP, mechanism: str, args: list[str]) -> None:
        """AUTH PLAIN or LOGIN, with an initial answer in `args` or after challenges."""
        if self._over_budget(session):
            self._failed(session, Reply.AUTH_THROTTLED)
            return
        if mechanism == "PLAIN":
            answer = await _initial_or_challenge(session, args, "")
            if answer is None:
                return
            parts = answer.split(b"\x00")
            if len(parts) != 3:
                session.reply(count(Reply.AUTH_BAD_PLAIN))
                return
            login, password = parts[1], parts[2]
        else:
            login_given = await _initial_or_challenge(session, args, LOGIN_CHALLENGE)
            if login_given is None:
                return
            password_given = await session.challenge(PASSWORD_CHALLENGE)
            if password_given is None:
                return
            login, password = login_given, password_given
        await self._check(session, login, password)

    async def _check(self, session: SubmissionSMTP, login: bytes, password: bytes) -> None:
        address = client_address(session)
        account = login.decode("utf-8", errors="replace")
        try:
            await self.throttle.wait_turn(address, account)
        except TimeoutError:
            session.reply(count(Reply.AUTH_TEMPORARY))
            return
        if self.throttle.address_refused(address):
            self._throttled.warning(
                "auth", "refused a login from %s: too many failed logins from there", address
            )
            self._failed(session, Reply.AUTH_THROTTLED)
            return
        if self.throttle.account_refused(address, account):
            self._throttled.warning(
                "account", "refused a login from %s: too many failed logins for it", address
            )
            self._failed(session, Reply.AUTH_ACCOUNT_THROTTLED)
            return
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
            session.reply(count(Reply.AUTH_TEMPORARY))
            return
        if agent is not None:
            self.throttle.succeeded(address)
            log.info("%s authenticated as %s", address, agent.email)
            session.agent = agent
            session.reply(Reply.AUTH_OK)
            return
        self.throttle.failed(address, account)
        shown = login[:100].decode("utf-8", errors="replace")
        log.warning("failed login %r from %s", shown, address)
        self._failed(session, Reply.AUTH_FAILED)

    def _over_budget(self, session: SubmissionSMTP) -> bool:
        """An address over its failed-login budget is refused before a password is read."""
        address = client_address(session)
        if not self.failed_logins.over_budget(address):
            return False
        self._throttled.warning(
            "auth", "refused a login from %s: too many failed logins from there", address
        )
        return True

    def _failed(self, session: SubmissionSMTP, reply: str) -> None:
        """A refused login; the session's own count closes it after max_auth_failures."""
        session.auth_failures += 1
        if session.auth_failures >= self.settings.smtp.max_auth_failures:
            session.reply(count(Reply.AUTH_TOO_MANY))
            session.close()
            return
        session.reply(count(reply))

    def handle_exception(self, error: Exception) -> str:
        """The reply to a failure of our own: never our internals (database addresses,
        paths), and a 4xx, so that the client tries again."""
        if isinstance(error, ssl.SSLError):  # e.g. a client certificate from an unknown CA
            log.info("SMTP session ended: TLS failed: %s", error)
            return count(Reply.LOCAL_ERROR)
        log.error("SMTP session failed", exc_info=error)
        return count(Reply.LOCAL_ERROR)

    # -- the envelope

    def agent_sender(self, session: SubmissionSMTP, address: str, options: list[str]) -> str:
        """MAIL FROM from an agent who logged in: one of the agent's addresses, or the null
        sender (the From header, checked at the end of DATA, is still the agent's)."""
        problem = address_problem(address) if address else None
        if problem is not None:
            return count(Reply.bad_sender(address, problem))
        if self.store is not None and not self.store.available:
            return count(Reply.STORE_UNAVAILABLE)  # before the client sends its data
        agent = session.agent
        assert agent is not None
        if not may_use_sender(agent, address):
            return count(Reply.not_your_address(address))
        session.mail_from = address
        session.mail_options = options
        return Reply.OK

    async def trusted_sender(
        self, session: SubmissionSMTP, address: str, options: list[str]
    ) -> None:
        """MAIL FROM from a trusted client: a domain it may send for (a database lookup), or
        the null sender, whose From header must be in one at the end of DATA."""
        problem = address_problem(address) if address else None
        if problem is not None:
            session.reply(count(Reply.bad_sender(address, problem)))
            return
        if self.store is not None and not self.store.available:
            session.reply(count(Reply.STORE_UNAVAILABLE))
            return
        found = _trusted_match(session)
        domains = await self.served.allowed(found, address)
        session.sender_domains = domains
        if not trusted.sends_for(domains, address):
            log.info(
                "%s (%s): refused sender %s", client_address(session), found.entry.name, address
            )
            session.reply(count(Reply.not_our_domain(address, "MAIL FROM")))
            return
        session.mail_from = address
        session.mail_options = options
        session.reply(Reply.OK)

    def recipient(self, session: SubmissionSMTP, address: str, options: list[str]) -> str:
        limit = self.settings.smtp.max_recipients
        if len(session.rcpt_tos) >= limit:
            return count(Reply.TOO_MANY_RECIPIENTS.format(limit=limit))
        problem = address_problem(address)
        if problem is not None:
            return count(Reply.bad_recipient(address, problem))
        session.rcpt_tos.append(address)
        session.rcpt_options.extend(options)
        return Reply.RCPT_OK

    async def handle_DATA(self, session: SubmissionSMTP, raw: bytes) -> str:
        mail_from = session.mail_from
        assert mail_from is not None
        tls = session.tls
        # RFC 3848's names, with RFC 6531 3.7.3's UTF8SMTP for ESMTP when MAIL asked for it
        esmtp = "UTF8SMTP" if "SMTPUTF8" in session.mail_options else "ESMTP"
        origin = Origin(
            helo=session.host_name,
            peer=client_address(session),
            protocol=f"{esmtp}SA" if tls else f"{esmtp}A",
        )
        submitter: Submitter
        try:
            if session.agent is not None:
                submitter = session.agent
            else:
                found = _trusted_match(session)
                submitter = await trusted.submitter_of_message(
                    found, session.sender_domains, self.db, mail_from, raw
                )
                origin = Origin(
                    helo=origin.helo,
                    peer=origin.peer,
                    protocol=f"{esmtp}S" if tls else esmtp,
                    trusted=TrustedOrigin(
                        found.entry.name, found.entry.settings.service_name, found.certificate_name
                    ),
                )
            message_id = await self.pipeline.submit(
                PipelineEnvelope(mail_from, tuple(session.rcpt_tos)),
                raw,
                submitter,
                origin,
                received=session.received,
            )
        except Rejected as refusal:
            log.info("refused mail from %s: %s", mail_from, refusal.reply)
            return count(refusal.reply)
        except StoreUnavailable as exc:
            log.warning("deferred mail from %s, blob store unavailable: %s", mail_from, exc)
            return count(Reply.STORE_UNAVAILABLE)  # the store told BlobHealth itself
        except Exception:
            log.exception("could not accept mail from %s", mail_from)
            return count(Reply.TEMPORARY)
        return count(Reply.QUEUED.format(message_id=message_id))


@functools.lru_cache(maxsize=4096)
def address_problem(address: str) -> str | None:
    """Why `address` is no valid mailbox for MAIL or RCPT, or None. The check reads only the
    text (no DNS), so its answer is kept: each message names the same sender, and often the
    same recipients, and the check costs about 65 us. A UTF-8 address passes here; the
    session has made sure that MAIL asked for SMTPUTF8."""
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return str(exc)
    return None


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
            if self.tls is None and not plaintext_ok and logins_needed(smtp, address):
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
    ) -> Callable[[], SubmissionSMTP]:
        smtp = self.settings.smtp
        listener = Listener(
            handler=self.handler,
            gate=self.gate,
            hostname=self.settings.server.hostname,
            timeout=smtp.timeout,
            size_limit=smtp.max_message_size,
            tls=tls,
            require_tls=require_tls,
            implicit_tls=implicit_tls,
            proxy=self.proxy,
            trusted=trusted_entries,
            spool_dir=self.spool_dir,
            data_budget=self.data_budget,
        )
        return functools.partial(SubmissionSMTP, listener)

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


def _trusted_match(session: SubmissionSMTP) -> TrustedMatch:
    """The trusted entry of a session that did not log in; the session let it past AUTH
    only because there is one."""
    found = session.trusted_match()
    if found is None:
        raise RuntimeError("MAIL without AUTH from a client that matches no trusted entry")
    return found


async def _initial_or_challenge(
    session: SubmissionSMTP, args: list[str], challenge: str
) -> bytes | None:
    """The client's first answer, inline (`AUTH PLAIN xyz`) or after a 334 challenge.

    None when it was cancelled or not base64; the reply has been given then.
    """
    if args:
        answer = _b64(args[0])
        if answer is None:
            session.reply(count(Reply.AUTH_BAD_BASE64))
        return answer
    return await session.challenge(challenge)


def _b64(value: str) -> bytes | None:
    try:
        return b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
