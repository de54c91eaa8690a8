"""Where outgoing copies go: an SMTP smart host, or a capture directory.

A transport answers per recipient with `(error, permanent)` in the manner of chasquid's
courier: None for delivered, else the reply and whether retrying could help.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

from gateway.config import UpstreamSettings
from gateway.mail.idn import ascii_address
from gateway.mail.outgoing import relay_id
from gateway.outbound.connection_cache import ConnectionCache
from gateway.outbound.smtp_connection import (
    ConnectionEnded,
    SmtpConnection,
    bare_line_end_refusal,
    copy_pieces,
)
from gateway.outbound.stored_copy import Outgoing, StoredCopy
from gateway.store.models import new_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    error: str | None = None
    permanent: bool = False
    remote_mta: str | None = None
    reply: str | None = None  # what the upstream said when it took the copy, for the log
    # The relay's own blob store failed, not the way to the recipient: the copy is never
    # given up for it, even past its lifetime (a bounce could not quote the original either).
    store_unavailable: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None


DELIVERED = Outcome()


@dataclass(frozen=True)
class Destination:
    """Where a copy's conversation goes, as the worker counts sends per destination
    (gateway/outbound/destination_gates.py): the key its connections are kept under, and
    the upstream's own lower limit if it has one (direct delivery's per domain)."""

    key: Hashable
    limit: int | None = None


class Upstream(Protocol):
    async def send(
        self, mail_from: str, recipients: Sequence[str], data: Outgoing
    ) -> dict[str, Outcome]: ...

    def destination(self, recipient: str) -> Destination:
        """Where a copy to `recipient` goes; copies to one destination may leave together."""

    async def close(self) -> None:
        """Let go of what is kept open (connections: QUIT); called once, at shutdown."""


class CaptureUpstream:
    """Writes each copy as `<message id>.eml` plus its envelope in `<message id>.json`.

    The name is the id the agent got in the 250 reply (a second copy of the same message is
    `<message id>-2.eml`, and so on), so a person finds the file of the mail they sent.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def send(
        self, mail_from: str, recipients: Sequence[str], data: Outgoing
    ) -> dict[str, Outcome]:
        if (refusal := bare_line_end_refusal(data)) is not None:
            return dict.fromkeys(recipients, Outcome(refusal))
        if isinstance(data, StoredCopy):
            path = await self._write_stream(mail_from, recipients, data)
        else:
            path = await asyncio.to_thread(self._write, mail_from, recipients, data)
        return dict.fromkeys(recipients, Outcome(reply=f"written to {path}"))

    def destination(self, recipient: str) -> Destination:
        return Destination(("capture", str(self.directory)))

    async def close(self) -> None:
        """Nothing is kept open."""

    def _write(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Path:
        staged = [self._stage(_envelope(mail_from, recipients)), self._stage(data)]
        try:
            return self._publish(relay_id(data) or new_id(), *staged)
        finally:
            for tmp in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    async def _write_stream(
        self, mail_from: str, recipients: Sequence[str], copy: StoredCopy
    ) -> Path:
        """A stored copy written as it is read; nothing is published when it cannot be read
        to its end as it was first read."""
        staged = [await asyncio.to_thread(self._stage, _envelope(mail_from, recipients))]
        try:
            fd, tmp = await asyncio.to_thread(tempfile.mkstemp, dir=self.directory, prefix=".tmp-")
            staged.append(tmp)
            with os.fdopen(fd, "wb") as handle:
                async for piece in copy_pieces(copy):
                    await asyncio.to_thread(handle.write, piece)
            name = relay_id(copy.head) or new_id()
            return await asyncio.to_thread(self._publish, name, *staged)
        finally:
            for tmp in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _stage(self, content: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        return tmp

    def _publish(self, name: str, envelope: str, message: str) -> Path:
        """Link both files under the first free name; the .eml appears last and whole, so a
        reader that sees it can trust both files."""
        for number in itertools.count(1):
            stem = name if number == 1 else f"{name}-{number}"
            try:
                os.link(envelope, self.directory / f"{stem}.json")
            except FileExistsError:
                continue
            os.link(message, self.directory / f"{stem}.eml")
            return self.directory / f"{stem}.eml"
        raise AssertionError("unreachable")


def _envelope(mail_from: str, recipients: Sequence[str]) -> bytes:
    return json.dumps({"mail_from": mail_from, "rcpt_tos": list(recipients)}).encode()


def client_tls_context(*, verify: bool, upstream: UpstreamSettings | None = None) -> ssl.SSLContext:
    """The context for STARTTLS (or implicit TLS) to the upstream.

    Unverified, the system's CA store would go unused: reading it costs tens of milliseconds
    of CPU for every relay started, which a test suite starting hundreds of relays pays.
    `upstream`: the upstream whose client certificate, if it has one, the context shows.
    """
    if verify:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if upstream is not None:
        show_client_certificate(context, upstream)
    return context


def show_client_certificate(context: ssl.SSLContext, settings: UpstreamSettings) -> None:
    """Load the upstream's `client_certificate` and `client_key` into `context`, once per
    upstream: every connection then shows it to a server that asks (config_check has read
    both files before start-up)."""
    if settings.client_certificate is not None:
        context.load_cert_chain(settings.client_certificate, settings.client_key)


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, knowing whether TLS is up and nothing was answered over it yet.

    A server that wants a client certificate (or refuses ours) finds out only after the TLS
    1.3 handshake, and ends the connection: the relay sees just an unexpected EOF.
    """

    tls_unanswered = False

    async def starttls(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        response = await super().starttls(*args, **kwargs)
        self.tls_unanswered = True
        return response

    async def execute_command(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        response = await super().execute_command(*args, **kwargs)
        self.tls_unanswered = False
        return response


KEPT = "kept"  # a smart host's connections share one key: the upstream is the destination


class SmtpUpstream:
    """A smart host: STARTTLS whenever the server offers it (smtp://), connections kept
    between copies (gateway/outbound/connection_cache.py)."""

    def __init__(
        self,
        settings: UpstreamSettings,
        local_hostname: str,
        *,
        url: str | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        """`url` and `login` (username, password) replace the settings' own: an agent's
        own account at their mail host (gateway/agent_logins.py)."""
        parts = urlsplit(url or settings.url)
        self.host = parts.hostname or "localhost"
        self.implicit_tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username: str | None
        self.password: str | None
        if login is not None:
            self.username, self.password = login
        else:  # the relay's own login; a password_file is read here, once per upstream
            self.username = settings.username or (
                unquote(parts.username) if parts.username else None
            )
            self.password = settings.login_password() or (
                unquote(parts.password) if parts.password else None
            )
        self.timeout = settings.timeout
        self.connect_timeout = settings.connect_timeout
        self.session_timeout = settings.session_timeout
        self.min_transfer_rate = settings.min_transfer_rate
        self.local_hostname = local_hostname
        self.pipelining = settings.pipelining
        self.chunking = settings.chunking
        self.connections = ConnectionCache(settings)
        self.tls_context = client_tls_context(verify=settings.verify_tls, upstream=settings)
        self.client_certificate = settings.client_certificate

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def deadline(self, size: int) -> float:
        """Seconds a whole conversation about `size` bytes may take before it is given up."""
        return self.session_timeout + size / self.min_transfer_rate

    def destination(self, recipient: str) -> Destination:
        """The host and the login: two routes to one smart host share its limit, two
        agents' own logins at one host do not."""
        return Destination(("smtp", self.host, self.port, self.username))

    async def send(
        self, mail_from: str, recipients: Sequence[str], data: Outgoing
    ) -> dict[str, Outcome]:
        """Over a kept connection when there is one, else a new one; a kept connection that
        fails before the data began is given up and the copy tried once more on a new one.

        Every step has a deadline, and so has the whole: a stalled upstream defers the copy
        instead of holding a worker slot forever."""
        total = self.deadline(len(data))
        client: _Client | None = None
        try:
            async with asyncio.timeout(total):
                kept = self.connections.take(KEPT)
                if kept is not None:
                    try:
                        return await self._transaction(kept, mail_from, recipients, data)
                    except ConnectionEnded as exc:
                        if not exc.before_data:
                            raise
                        log.info(
                            "%s: a kept connection ended (%s); opening a new one", self.where, exc
                        )
                client = self._client()
                await client.connect(timeout=self.connect_timeout)
                if self.username and self.password:
                    await client.login(self.username, self.password)
                connection = await SmtpConnection.adopt(
                    client,
                    remote=self.host,
                    where=self.where,
                    pipelining=self.pipelining,
                    chunking=self.chunking,
                )
                client = None
                return await self._transaction(connection, mail_from, recipients, data)
        except ConnectionEnded as exc:
            return dict.fromkeys(recipients, ended(exc, self.host))
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Our credentials are wrong, not the message: keep it queued until an admin fixes
            # the config, rather than bounce every copy.
            refused = refusal(exc.code, exc.message, self.host)
            login = Outcome(f"login refused: {refused.error}", False, refused.remote_mta)
            return dict.fromkeys(recipients, login)
        except aiosmtplib.SMTPResponseException as exc:
            return dict.fromkeys(recipients, refusal(exc.code, exc.message, self.host))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = failure_reason(exc, self.where, total)
            if client is not None and client.tls_unanswered:
                reason += self.certificate_hint(exc)
            return dict.fromkeys(recipients, Outcome(reason, permanent=False))
        finally:
            if client is not None:
                client.close()

    def _client(self) -> _Client:
        client = _Client(
            hostname=self.host,
            port=self.port,
            use_tls=self.implicit_tls,
            start_tls=None,
            tls_context=self.tls_context,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
        )
        client.tls_unanswered = self.implicit_tls
        return client

    async def _transaction(
        self,
        connection: SmtpConnection,
        mail_from: str,
        recipients: Sequence[str],
        data: Outgoing,
    ) -> dict[str, Outcome]:
        """The copy over `connection`, which is kept afterwards when it is still fit (a copy
        refused before anything was written leaves it so), else closed."""
        try:
            return await transaction(connection, mail_from, recipients, data, self.timeout)
        finally:
            self.connections.keep(KEPT, connection)

    async def close(self) -> None:
        """QUIT on the kept connections."""
        await self.connections.close()

    def certificate_hint(self, exc: BaseException) -> str:
        """Why the upstream may have ended the connection as TLS began; "" when `exc`
        (or, from implicit TLS's connect, its cause) is not such an ending."""
        cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError) or not isinstance(
            cause, (aiosmtplib.SMTPServerDisconnected, ssl.SSLError)
        ):
            return ""  # its certificate, not ours, or no conversation at all
        if self.client_certificate is None:
            return (
                " (the connection ended as TLS began: the upstream may require a client"
                " certificate; set client_certificate and client_key)"
            )
        return (
            " (the connection ended as TLS began: the upstream may not accept the client"
            f" certificate {self.client_certificate})"
        )


def failure_reason(exc: BaseException, where: str, deadline: float) -> str:
    """A connection-level failure as the log and the DSN say it: where, and what happened."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"{where}: no progress in time (deadline {deadline:.0f} s)"
    return f"{where}: {exc or type(exc).__name__}"


def ended(exc: ConnectionEnded, remote: str) -> Outcome:
    """A conversation that broke: the upstream's 421 when it said one, else why (temporary)."""
    if exc.reply is not None:
        return refusal(exc.reply.code, exc.reply.message, remote)
    return Outcome(str(exc), permanent=False, remote_mta=remote)


async def transaction(
    connection: SmtpConnection,
    mail_from: str,
    recipients: Sequence[str],
    data: Outgoing,
    reply_timeout: float,
) -> dict[str, Outcome]:
    """One copy over `connection`; the upstream's refusals per recipient.

    Outcomes name `connection.remote` (the smart host, or the MX host used). Raises
    ConnectionEnded when the conversation broke, BareLineEnd before anything was sent."""
    remote = connection.remote
    outcomes: dict[str, Outcome] = {}
    written, sent = recipients, recipients  # RCPT's addresses, and the caller's for each
    if not connection.smtputf8 and not all(a.isascii() for a in (mail_from, *recipients)):
        mail_from, written, sent, outcomes = _without_smtputf8(mail_from, recipients, remote)
        if not sent:
            return outcomes
    replies = await connection.send(mail_from, written, data, reply_timeout)
    if replies.mail.code != 250:
        failed = refusal(replies.mail.code, replies.mail.message, remote)
        return outcomes | dict.fromkeys(sent, failed)
    for recipient, reply in zip(sent, replies.rcpt, strict=True):
        if reply.code not in (250, 251):
            outcomes[recipient] = refusal(reply.code, reply.message, remote)
    accepted = [r for r in recipients if r not in outcomes]
    if not accepted:
        return outcomes
    taken = replies.data
    if taken is None:
        outcomes.update(dict.fromkeys(accepted, Outcome("no reply to DATA", remote_mta=remote)))
    elif taken.code != 250:
        outcomes.update(dict.fromkeys(accepted, refusal(taken.code, taken.message, remote)))
    else:
        outcomes.update(dict.fromkeys(accepted, Outcome(reply=taken.text, remote_mta=remote)))
    return outcomes


def _without_smtputf8(
    mail_from: str, recipients: Sequence[str], remote: str
) -> tuple[str, list[str], list[str], dict[str, Outcome]]:
    """The envelope for an upstream that does not offer SMTPUTF8: each address with its domain
    in A-labels (the same mailbox); the recipients so written and the caller's for each; and
    the outcome of each copy that cannot go so. A UTF-8 local part needs SMTPUTF8 (RFC 6531
    3.2): a permanent failure, as Postfix gives it; a UTF-8 sender fails every recipient."""
    sender = ascii_address(mail_from)
    written: list[str] = []
    sent: list[str] = []
    outcomes: dict[str, Outcome] = {}
    for recipient in recipients:
        address = ascii_address(recipient)
        if sender is None or address is None:
            whose = "the sender's" if sender is None else "this recipient's"
            outcomes[recipient] = Outcome(
                f"550 5.6.7 {remote} does not offer SMTPUTF8, which {whose} address needs",
                permanent=True,
                remote_mta=remote,
            )
        else:
            written.append(address)
            sent.append(recipient)
    return sender or mail_from, written, sent, outcomes


def refusal(code: int, message: str, remote: str) -> Outcome:
    text = " ".join(f"{code} {message}".split())
    # 530 "Authentication required" (RFC 4954) means our relay is not set up to log in
    # upstream: a configuration problem to retry through, not a verdict on the message.
    permanent = 500 <= code < 600 and code != 530
    return Outcome(text, permanent=permanent, remote_mta=remote)


def relay_name(url: str, remote_mta: str | None = None) -> str:
    """Where copies go, as the log names it: HOST:PORT, the capture URL, or for direct
    delivery the MX host that took (or refused) the copy."""
    if url.startswith("capture:"):
        return url
    if url == "mx:":
        return remote_mta or url
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (465 if parts.scheme == 'smtps' else 25)}"
