"""The SMTP front through real clients: every reply it gives, and nothing half-written.

Each refusal is checked twice: the client gets the code and a human sentence, and the store
stays empty (no `messages` or `deliveries` row, the upstream sink got nothing). Protocol abuse
(smuggling, bare line ends, too many failed logins) is written as raw bytes over a socket;
polite sessions use `smtplib` (in a thread) and `aiosmtplib`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import smtplib
import ssl
import warnings
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from gateway import users
from gateway.fronts.smtp import SmtpFront
from gateway.fronts.smtp_replies import Reply
from gateway.intake.pipeline import Pipeline
from gateway.mail import dkim, headers
from gateway.mail.outgoing import Signer
from gateway.store import bulk
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Delivery, Event, InlineBlob, Message
from sealrelay.serve import Relay
from tests.conftest import (
    AGENT,
    ALIAS,
    DKIM_DOMAIN,
    DKIM_SELECTOR,
    PASSWORD,
    Harness,
    dkim_dns,
    make_message,
    relay_settings,
)
from tests.support import Sink, free_port

TIMEOUT = 15
PROSPECT = "prospect@example.com"
VICTIM = "victim@example.net"


# -- a raw client for what polite clients never send


def client_tls() -> ssl.SSLContext:
    """The relay's certificate is self-signed: encrypt, do not verify."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store: nothing is verified
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Answer:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(line[4:] for line in self.lines)


class Wire:
    """One SMTP connection spoken byte by byte, every read bounded by TIMEOUT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, implicit_tls: bool = False) -> Wire:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_tls() if implicit_tls else None),
            TIMEOUT,
        )
        wire = cls(reader, writer)
        greeting = await wire.answer()
        assert greeting.code == 220, greeting
        return wire

    async def answer(self) -> Answer:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            assert line.endswith(b"\r\n"), f"connection ended mid-reply: {lines} {line!r}"
            lines.append(line[:-2].decode())
            if line[3:4] != b"-":
                return Answer(int(lines[0][:3]), lines)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def command(self, line: str) -> Answer:
        await self.write(line.encode() + b"\r\n")
        return await self.answer()

    async def ehlo(self) -> Answer:
        answer = await self.command("EHLO client.example")
        assert answer.code == 250, answer
        return answer

    async def starttls(self) -> None:
        answer = await self.command("STARTTLS")
        assert answer.code == 220, answer
        await asyncio.wait_for(self.writer.start_tls(client_tls()), TIMEOUT)

    async def data(self, payload: bytes) -> Answer:
        """DATA with `payload` sent as is: it must carry its own final CRLF.CRLF."""
        answer = await self.command("DATA")
        assert answer.code == 354, answer
        await self.write(payload)
        return await self.answer()

    async def closed_by_server(self) -> bool:
        try:
            rest = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        except (ConnectionError, ssl.SSLError):
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


def plain_token(login: str = AGENT, password: str = PASSWORD) -> str:
    return b64encode(f"\0{login}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return b64encode(text.encode()).decode()


@pytest.fixture
async def wire(relay: Harness) -> AsyncIterator[Wire]:
    """A raw connection to the submission port, after EHLO, STARTTLS and EHLO again."""
    connection = await Wire.open(relay.smtp_port)
    await connection.ehlo()
    await connection.starttls()
    await connection.ehlo()
    yield connection
    await connection.close()


@pytest.fixture
async def agent(wire: Wire) -> Wire:
    """The same connection, logged in as the agent."""
    answer = await wire.command(f"AUTH PLAIN {plain_token()}")
    assert answer.lines == ["235 2.7.0 Authentication successful"]
    return wire


# -- messages and what the store holds


FILE_SIZED = b"Guten Tag!\r\n" * 8000  # over [storage] inline_max_bytes


def raw_message(
    *,
    author: str | None = f"Anna Agent <{AGENT}>",
    to: str = PROSPECT,
    extra: tuple[str, ...] = (),
    body: bytes = b"Guten Tag!\r\n",
) -> bytes:
    """CRLF message bytes without Message-ID and Date unless `extra` brings them."""
    lines = [f"From: {author}"] if author is not None else []
    lines += [f"To: {to}", "Subject: Ihr Expose", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def dotted(raw: bytes) -> bytes:
    """`raw` dot-stuffed and terminated, as a client sends it after DATA."""
    stuffed = re.sub(rb"(?m)^\.", b"..", raw)
    return stuffed + b".\r\n"


async def stored(relay: Harness) -> tuple[int, int]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    return messages or 0, deliveries or 0


async def assert_nothing_written(relay: Harness) -> None:
    assert await stored(relay) == (0, 0)
    async with relay.relay.db.transaction() as session:
        received = await session.scalar(
            select(func.count()).select_from(Event).where(Event.type == "message.received")
        )
    assert received == 0
    assert relay.sink.messages == []


async def send_sentinel(relay: Harness, wire: Wire) -> None:
    """A proper message on the same connection: the session still works, and it is the
    only thing upstream ever sees."""
    assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await wire.data(dotted(raw_message(extra=("X-Sentinel: yes",))))
    assert answer.code == 250 and "queued as" in answer.text, answer
    [copy] = await relay.sink.expect(1)
    assert copy.rcpt_tos == [PROSPECT]
    assert b"X-Sentinel: yes" in copy.data
    assert await stored(relay) == (1, 1)


async def submit(client: aiosmtplib.SMTP, recipients: list[str], raw: bytes) -> str:
    """MAIL, RCPT, DATA with aiosmtplib on a logged-in client; the 250 reply to DATA."""
    await client.mail(AGENT)
    for address in recipients:
        await client.rcpt(address)
    response = await client.data(raw)
    assert response.code == 250, response
    return response.message


def verify_dkim(relay: Harness, data: bytes) -> None:
    assert dkimpy.verify(data, dnsfunc=dkim_dns(relay.dkim_key)), "DKIM signature invalid"


def signed_names(data: bytes) -> list[str]:
    value = headers.first_value(headers.fields_of(data), "dkim-signature")
    assert value is not None
    match = re.search(r"\bh=([^;]+)", value)
    assert match is not None
    return [name.strip().lower() for name in re.sub(r"\s", "", match.group(1)).split(":")]


# -- STARTTLS, AUTH, the listeners


async def test_plain_port_offers_auth_only_after_starttls(relay: Harness) -> None:
    wire = await Wire.open(relay.smtp_port)
    try:
        offered = await wire.ehlo()
        assert "250-STARTTLS" in offered.lines
        assert not any("AUTH" in line for line in offered.lines)
        for command in (f"AUTH PLAIN {plain_token()}", "AUTH LOGIN", f"MAIL FROM:<{AGENT}>"):
            answer = await wire.command(command)
            assert answer.lines == ["530 5.7.0 Must issue a STARTTLS command first"], command

        await wire.starttls()
        offered = await wire.ehlo()
        assert "250-AUTH LOGIN PLAIN" in offered.lines
        assert "250-STARTTLS" not in offered.lines
        answer = await wire.command(f"AUTH PLAIN {plain_token()}")
        assert answer.code == 235
    finally:
        await wire.close()
    await assert_nothing_written(relay)


async def test_mail_without_auth_is_refused_530(relay: Harness, wire: Wire) -> None:
    for command in (f"MAIL FROM:<{AGENT}>", f"RCPT TO:<{PROSPECT}>", "DATA"):
        answer = await wire.command(command)
        assert answer.lines == ["530 5.7.0 Authentication required"], command
    await assert_nothing_written(relay)


class RecordingSMTP(smtplib.SMTP):
    """smtplib as is, keeping what it put on the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[bytes] = []
        super().__init__(*args, **kwargs)

    def send(self, s: str | bytes) -> None:
        self.sent.append(s.encode() if isinstance(s, str) else s)
        super().send(s)


def smtplib_submit(port: int, mechanism: str, inline: bool) -> tuple[int, list[bytes]]:
    form = f"{mechanism} {'inline' if inline else 'challenge'}"
    with RecordingSMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.starttls(context=client_tls())
        client.ehlo()
        client.user, client.password = AGENT, PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, _ = client.auth(mechanism, authobject, initial_response_ok=inline)
        refused = client.sendmail(AGENT, [PROSPECT], raw_message(extra=(f"X-Form: {form}",)))
        assert refused == {}
        return code, client.sent


async def test_auth_plain_and_login_work_inline_and_challenged(relay: Harness) -> None:
    forms = [(mechanism, inline) for mechanism in ("PLAIN", "LOGIN") for inline in (True, False)]
    for n, (mechanism, inline) in enumerate(forms, start=1):
        code, sent = await asyncio.to_thread(smtplib_submit, relay.smtp_port, mechanism, inline)
        assert code == 235, (mechanism, inline)
        [auth_line] = [line for line in sent if line.startswith(b"AUTH")]
        expected = f"AUTH {mechanism} " if inline else f"AUTH {mechanism}\r\n"
        assert auth_line.startswith(expected.encode()), auth_line
        await relay.sink.expect(n)
    for copy in relay.sink.messages:
        verify_dkim(relay, copy.data)
    forms_seen = sorted(
        headers.first_value(headers.fields_of(m.data), "x-form") or "" for m in relay.sink.messages
    )
    assert forms_seen == sorted(f"{m} {'inline' if i else 'challenge'}" for m, i in forms)


async def test_auth_login_challenge_form_on_the_wire(relay: Harness, wire: Wire) -> None:
    first = await wire.command("AUTH LOGIN")
    assert first.lines == ["334 " + b64("User Name\0")]
    second = await wire.command(b64(AGENT))
    assert second.lines == ["334 " + b64("Password\0")]
    assert (await wire.command(b64(PASSWORD))).lines == ["235 2.7.0 Authentication successful"]
    await send_sentinel(relay, wire)


async def test_auth_plain_challenge_then_send_on_the_same_connection(
    relay: Harness, wire: Wire
) -> None:
    assert (await wire.command("AUTH PLAIN")).lines == ["334 "]
    assert (await wire.command(plain_token())).code == 235
    await send_sentinel(relay, wire)


async def test_auth_protocol_mistakes_get_one_reply_each(relay: Harness, wire: Wire) -> None:
    """Each mistake gets exactly one reply line: the NOOP after it must get its own 250."""
    mistakes = [
        (["AUTH PLAIN not*base64"], "501 5.5.2 Cannot decode the base64 answer"),
        (["AUTH LOGIN not*base64"], "501 5.5.2 Cannot decode the base64 answer"),
        ([f"AUTH PLAIN {b64('only-one-part')}"], "501 5.5.2 AUTH PLAIN needs"),
        (["AUTH PLAIN " + b64("a\0b\0c\0d")], "501 5.5.2 AUTH PLAIN needs"),
        (["AUTH PLAIN", "*"], "501 5.7.0"),
        (["AUTH PLAIN", "not*base64"], "501 5.5.2"),
        (["AUTH LOGIN", "*"], "501 5.7.0"),
        (["AUTH LOGIN", b64(AGENT), "*"], "501 5.7.0"),
        (["AUTH LOGIN", b64(AGENT), "not*base64"], "501 5.5.2"),
        (["AUTH CRAM-MD5"], "504 5.5.4"),
        (["AUTH"], "501 "),
    ]
    for commands, expected in mistakes:
        for command in commands[:-1]:
            assert (await wire.command(command)).code == 334, commands
        answer = await wire.command(commands[-1])
        assert answer.lines[0].startswith(expected), (commands, answer)
        assert (await wire.command("NOOP")).lines == ["250 2.0.0 OK"], commands
    # protocol mistakes are not failed logins: the connection is still open and usable
    assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
    assert (await wire.command(f"AUTH PLAIN {plain_token()}")).lines == [
        "503 5.5.1 Already authenticated"
    ]
    await send_sentinel(relay, wire)


async def test_implicit_tls_port_takes_auth_and_mail(relay: Harness) -> None:
    wire = await Wire.open(relay.tls_port, implicit_tls=True)
    try:
        offered = await wire.ehlo()
        assert "250-AUTH LOGIN PLAIN" in offered.lines
        assert "250-STARTTLS" not in offered.lines
        answer = await wire.command(f"MAIL FROM:<{AGENT}>")
        assert answer.lines == ["530 5.7.0 Authentication required"]
    finally:
        await wire.close()

    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.tls_port,
        use_tls=True,
        validate_certs=False,
        timeout=TIMEOUT,
    )
    async with client:
        await client.login(AGENT, PASSWORD)
        text = await submit(client, [PROSPECT], raw_message())
    assert text.startswith("2.0.0 Ok: queued as ")
    [copy] = await relay.sink.expect(1)
    received = headers.first_value(headers.fields_of(copy.data), "received")
    assert received is not None and "with ESMTPSA" in received
    verify_dkim(relay, copy.data)


# -- the development front: plaintext AUTH on loopback only


@pytest.fixture
async def dev_relay(
    database: Database,
    sink: Sink,
    tmp_path: Path,
    dkim_key: dkim.DkimKey,
    dkim_key_file: Path,
) -> AsyncIterator[Harness]:
    settings = relay_settings(
        tmp_path,
        sink.port,
        smtp={"allow_plaintext_auth_on_loopback": True},
        dkim={DKIM_DOMAIN: {"selector": DKIM_SELECTOR, "key_file": str(dkim_key_file)}},
    )
    assert settings.smtp.tls_cert is None
    await users.add_user(database, AGENT, PASSWORD, aliases=(ALIAS,))
    relay = Relay(settings, db=database, signer=Signer({DKIM_DOMAIN: dkim_key}))
    await relay.start()
    try:
        yield Harness(relay, sink, settings, dkim_key)
    finally:
        await relay.stop()


def smtplib_plaintext_submit(port: int) -> dict[str, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo()
        features = dict(client.esmtp_features)
        client.login(AGENT, PASSWORD)
        assert client.sendmail(AGENT, [PROSPECT], raw_message()) == {}
        return features


async def test_dev_relay_allows_plaintext_auth_on_loopback(dev_relay: Harness) -> None:
    features = await asyncio.to_thread(smtplib_plaintext_submit, dev_relay.smtp_port)
    assert "starttls" not in features
    assert features["auth"].split() == ["LOGIN", "PLAIN"]

    [copy] = await dev_relay.sink.expect(1)
    received = headers.first_value(headers.fields_of(copy.data), "received")
    assert received is not None and "with ESMTPA " in received
    verify_dkim(dev_relay, copy.data)


async def test_connections_to_a_plaintext_listener_log_no_warning_and_still_need_auth(
    dev_relay: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd would warn on each connection that AUTH does not wait for STARTTLS: on the
    loopback development front that is the configured policy, not news for the log."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        for _ in range(2):
            wire = await Wire.open(dev_relay.smtp_port)
            try:
                await wire.ehlo()
                answer = await wire.command(f"MAIL FROM:<{AGENT}>")
                assert answer.lines == ["530 5.7.0 Authentication required"]
            finally:
                await wire.close()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    await assert_nothing_written(dev_relay)


@pytest.mark.parametrize(
    "smtp",
    [
        pytest.param({}, id="loopback-without-the-dev-switch"),
        pytest.param(
            {"allow_plaintext_auth_on_loopback": True, "listen": ["0.0.0.0:2525"]},
            id="dev-switch-on-a-public-address",
        ),
    ],
)
async def test_front_without_tls_refuses_to_start(tmp_path: Path, smtp: dict[str, Any]) -> None:
    settings = relay_settings(tmp_path, free_port(), smtp=smtp)
    db = Database.connect(f"sqlite+aiosqlite:///{tmp_path}/unused.db")
    front = SmtpFront(settings, db, Pipeline(settings, db, LocalBlobStore(tmp_path / "blobs")))
    try:
        with pytest.raises(RuntimeError, match=r"smtp\.listen .*agents could not log in.*tls_cert"):
            await front.start()
        assert front.servers == []
    finally:
        await front.stop()
        await db.close()


# -- failed logins


async def login_is_refused(relay: Harness, login: str, password: str) -> None:
    async with relay.client() as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.login(login, password)
        assert refused.value.code == 535
        assert refused.value.message == "5.7.8 Authentication failed: wrong login or password"
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as unauthenticated:
            await client.mail(AGENT)
        assert unauthenticated.value.code == 530


async def test_bad_credentials_get_535(relay: Harness) -> None:
    await login_is_refused(relay, AGENT, "not the password")
    await login_is_refused(relay, "nobody@broker.example", PASSWORD)
    await login_is_refused(relay, ALIAS, PASSWORD)  # an alias is an address, not a login
    await users.set_disabled(relay.relay.db, AGENT)
    await login_is_refused(relay, AGENT, PASSWORD)
    await assert_nothing_written(relay)


async def test_disabled_user_can_log_in_again_once_enabled(relay: Harness) -> None:
    await users.set_disabled(relay.relay.db, AGENT)
    await users.set_disabled(relay.relay.db, AGENT, disabled=False)
    await relay.send(raw_message(), recipients=[PROSPECT])
    await relay.sink.expect(1)


async def test_third_failed_login_closes_the_connection_421(relay: Harness, wire: Wire) -> None:
    assert relay.settings.smtp.max_auth_failures == 3
    bad = plain_token(password="wrong password")
    assert (await wire.command(f"AUTH PLAIN {bad}")).code == 535
    assert (await wire.command("AUTH LOGIN")).code == 334
    assert (await wire.command(b64("nobody@broker.example"))).code == 334
    assert (await wire.command(b64(PASSWORD))).code == 535
    answer = await wire.command(f"AUTH PLAIN {bad}")
    assert answer.lines == ["421 4.7.0 Too many failed logins; closing the connection"]
    assert await wire.closed_by_server()
    await assert_nothing_written(relay)

    # the count is per connection: a new one may log in
    await relay.send(raw_message(), recipients=[PROSPECT])
    await relay.sink.expect(1)


async def test_two_failures_then_the_right_password_still_logs_in(
    relay: Harness, wire: Wire
) -> None:
    bad = plain_token(password="wrong password")
    for _ in range(2):
        assert (await wire.command(f"AUTH PLAIN {bad}")).code == 535
    assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
    await send_sentinel(relay, wire)


# -- who may send as whom


async def test_mail_from_an_address_not_the_agents_553_571(relay: Harness, agent: Wire) -> None:
    for address in ("boss@broker.example", "agent@other.example", "Agent@Broker.Example.com"):
        answer = await agent.command(f"MAIL FROM:<{address}>")
        assert answer.lines == [
            f"553 5.7.1 You may not send as <{address}>: it is not one of your addresses"
        ]
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_alias_is_allowed_in_envelope_and_header(relay: Harness) -> None:
    raw = raw_message(author=f"Team <{ALIAS}>")
    reply = await relay.send(raw, sender=ALIAS, recipients=[PROSPECT])
    assert reply.startswith("2.0.0 Ok: queued as ")
    [copy] = await relay.sink.expect(1)
    assert copy.mail_from == ALIAS
    verify_dkim(relay, copy.data)


async def test_sender_case_does_not_matter(relay: Harness) -> None:
    raw = raw_message(author="Anna <Agent@Broker.EXAMPLE>")
    reply = await relay.send(raw, sender="AGENT@broker.example", recipients=[PROSPECT])
    assert reply.startswith("2.0.0 Ok: queued as ")
    await relay.sink.expect(1)


async def test_header_from_not_the_agents_553_571_at_end_of_data(
    relay: Harness, agent: Wire
) -> None:
    for author in [
        "boss@broker.example",
        "Anna Agent <boss@broker.example>",
        f'"{AGENT}" <boss@broker.example>',
        f"{AGENT}, boss@broker.example",
        f"<boss@broker.example>{AGENT}",
        f"boss@broker.example (via {AGENT})",
        f"{AGENT} (comment) boss@broker.example",
    ]:
        assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        answer = await agent.data(dotted(raw_message(author=author)))
        assert answer.code == 553, (author, answer)
        assert answer.text.startswith("5.7.1 You may not send as "), (author, answer)
        assert answer.text.endswith(" (From header)"), (author, answer)
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_second_from_header_must_be_the_agents_too(relay: Harness, agent: Wire) -> None:
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(extra=("From: boss@broker.example",))))
    assert answer.lines == ["553 5.7.1 You may not send as boss@broker.example (From header)"]
    await assert_nothing_written(relay)


async def test_no_from_header_550_560(relay: Harness, agent: Wire) -> None:
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(author=None)))
    assert answer.lines == ["550 5.6.0 The message has no From header"]
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


# -- address syntax


INVALID_ADDRESSES = [
    ("a@b", "The part after the @-sign is not valid. It should have a period."),
    ("no-at-sign", "An email address must have an @-sign."),
    ("x@-bad-.com", "An email address cannot have a hyphen immediately after the @-sign."),
    ("a..b@example.com", "An email address cannot have two periods in a row."),
    ('"x y"@example.com', "Quoting the part before the @-sign is not allowed here."),
    ("someone@[127.0.0.1]", "A bracketed IP address after the @-sign is not allowed here."),
]


async def test_invalid_sender_553_517(relay: Harness, agent: Wire) -> None:
    for address, why in INVALID_ADDRESSES:
        answer = await agent.command(f"MAIL FROM:<{address}>")
        assert answer.lines == [f"553 5.1.7 The sender address <{address}> is not valid: {why}"]
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_invalid_recipients_553_513_and_the_valid_one_still_gets_it(
    relay: Harness, agent: Wire
) -> None:
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    for address, why in INVALID_ADDRESSES:
        answer = await agent.command(f"RCPT TO:<{address}>")
        assert answer.lines == [f"553 5.1.3 The recipient address <{address}> is not valid: {why}"]
    assert await stored(relay) == (0, 0)

    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).lines == ["250 2.1.5 Ok"]
    assert (await agent.data(dotted(raw_message()))).code == 250
    [copy] = await relay.sink.expect(1)
    assert copy.rcpt_tos == [PROSPECT]
    assert await stored(relay) == (1, 1)


MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]"


def on_the_wire(answer: Answer) -> bool:
    """Every line of `answer` holds RFC 5321's reply text: tab and printable US-ASCII."""
    return all(ch == "\t" or " " <= ch <= "~" for line in answer.lines for ch in line)


async def test_what_the_client_sent_comes_back_printable(relay: Harness, agent: Wire) -> None:
    """Replies quote the client's address, command or From header: a control character or
    a non-ASCII letter in them is never written back as it came."""
    assert "250-ENHANCEDSTATUSCODES" in (await agent.ehlo()).lines
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    refused = await agent.command("RCPT TO:<a\x00b\x1b@example.com>")
    assert refused.code == 553 and refused.text.startswith("5.1.3 "), refused
    assert "<a?b?@example.com>" in refused.text and on_the_wire(refused), refused

    await agent.write("RCPT TO:<müller@example.de>\r\n".encode())
    assert (await agent.answer()).lines == [Reply.NON_ASCII_ADDRESS]
    unknown = await agent.command("\x07BOGUS")
    assert unknown.lines == ['500 5.5.1 Error: command "?BOGUS" not recognized']

    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(author="bö\x01ss@broker.example")))
    assert answer.code == 553 and answer.text.startswith("5.7.1 "), answer
    assert "?ss@broker.example" in answer.text and on_the_wire(answer), answer
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_a_utf8_address_needs_smtputf8_at_mail(relay: Harness, agent: Wire) -> None:
    """RFC 6531: SMTPUTF8 is offered; a UTF-8 address is taken only in a transaction whose
    MAIL asked for it, a path that is not UTF-8 is a syntax error, and the parameter takes
    no value. Nothing of the refused transactions is kept."""
    assert "250-SMTPUTF8" in (await agent.ehlo()).lines
    await agent.write(f"MAIL FROM:<jörg@{DKIM_DOMAIN}>\r\n".encode())
    assert (await agent.answer()).lines == [Reply.NON_ASCII_ADDRESS]
    refused = await agent.command(f"MAIL FROM:<{AGENT}> SMTPUTF8=yes")
    assert refused.lines == ["501 5.5.4 Error: SMTPUTF8 takes no value"]

    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    await agent.write("RCPT TO:<jörg@bücher.example>\r\n".encode())
    assert (await agent.answer()).lines == [Reply.NON_ASCII_ADDRESS]
    await agent.write("RCPT TO:<jörg@bücher.example>\r\n".encode("latin-1"))
    assert (await agent.answer()).lines == [Reply.NOT_UTF8_ADDRESS]
    assert (await agent.command("RSET")).code == 250

    await agent.write(f"MAIL FROM:<jörg@{DKIM_DOMAIN}> SMTPUTF8\r\n".encode())
    refused = await agent.answer()
    assert refused.code == 553 and refused.text.startswith("5.7.1 "), refused
    assert on_the_wire(refused), refused
    assert (await agent.command(f"MAIL FROM:<{AGENT}> SMTPUTF8")).code == 250
    await agent.write("RCPT TO:<jörg@bücher.example>\r\n".encode())
    assert (await agent.answer()).lines == [Reply.RCPT_OK]
    await agent.write("RCPT TO:<jörg@bü..example>\r\n".encode())
    refused = await agent.answer()
    assert refused.code == 553 and refused.text.startswith("5.1.3 "), refused
    assert (await agent.command("RSET")).code == 250
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_an_agents_read_receipt_with_the_null_sender_goes_out_with_it(
    relay: Harness, agent: Wire
) -> None:
    """MAIL FROM:<> (a read receipt, an auto-reply) is the agent's when the From header is;
    `<>` is no recipient and no empty path."""
    assert (await agent.command("MAIL FROM:")).lines == [MAIL_SYNTAX]
    assert (await agent.command("MAIL FROM:<>")).lines == ["250 2.1.0 Ok"]
    assert (await agent.command("MAIL FROM:<>")).lines == ["503 5.5.1 Error: nested MAIL command"]
    assert (await agent.command("RCPT TO:<>")).lines == [RCPT_SYNTAX]
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(author="boss@broker.example")))
    assert answer.lines == ["553 5.7.1 You may not send as boss@broker.example (From header)"]
    await assert_nothing_written(relay)

    assert (await agent.command("MAIL FROM:<> BODY=8BITMIME")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    assert (await agent.data(dotted(raw_message()))).code == 250
    [copy] = await relay.sink.expect(1)
    assert (copy.mail_from, copy.rcpt_tos) == ("<>", [PROSPECT])
    verify_dkim(relay, copy.data)


async def test_data_without_a_valid_recipient_is_refused(relay: Harness, agent: Wire) -> None:
    """Every RCPT refused: 554 as Postfix and Exim answer, which tells a client that sent
    DATA in the same batch why; no RCPT at all is a command out of order (503)."""
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command("DATA")).lines == ["503 5.5.1 Error: need RCPT command"]
    assert (await agent.command("RCPT TO:<a@b>")).code == 553
    assert (await agent.command("RCPT TO:<>")).code == 501
    assert (await agent.command("DATA")).lines == ["554 5.5.1 Error: no valid recipients"]
    assert (await agent.command("RSET")).code == 250
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command("DATA")).lines == ["503 5.5.1 Error: need RCPT command"]
    await assert_nothing_written(relay)


# -- limits


async def test_sixth_recipient_452_and_the_first_five_get_the_mail(
    relay: Harness, agent: Wire
) -> None:
    assert relay.settings.smtp.max_recipients == 5
    recipients = [f"p{n}@example.com" for n in range(1, 7)]
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    for address in recipients[:5]:
        assert (await agent.command(f"RCPT TO:<{address}>")).lines == ["250 2.1.5 Ok"]
    answer = await agent.command(f"RCPT TO:<{recipients[5]}>")
    assert answer.lines == ["452 4.5.3 Too many recipients; at most 5 per message"]
    answer = await agent.data(dotted(raw_message(to=", ".join(recipients))))
    assert answer.code == 250, answer

    [copy] = await relay.sink.expect(1)
    assert sorted(copy.rcpt_tos) == recipients[:5]
    assert await stored(relay) == (1, 5)
    async with relay.relay.db.transaction() as session:
        queued = (await session.scalars(select(Delivery.recipient))).all()
    assert sorted(queued) == recipients[:5]


async def test_size_parameter_over_the_limit_552(relay: Harness, agent: Wire) -> None:
    assert "250-SIZE 1048576" in (await agent.ehlo()).lines
    answer = await agent.command(f"MAIL FROM:<{AGENT}> SIZE={1024 * 1024 + 1}")
    assert answer.code == 552
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).lines == [
        "503 5.5.1 Error: need MAIL command"
    ]
    await assert_nothing_written(relay)
    answer = await agent.command(f"MAIL FROM:<{AGENT}> SIZE={1024 * 1024}")
    assert answer.lines == ["250 2.1.0 Ok"]
    assert (await agent.command("RSET")).code == 250
    await send_sentinel(relay, agent)


async def test_data_over_the_limit_552(relay: Harness, agent: Wire) -> None:
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    line = b"x" * 998 + b"\r\n"
    big = raw_message(body=line * (1024 * 1024 // len(line) + 10))
    assert len(big) > 1024 * 1024
    answer = await agent.data(dotted(big))
    assert answer.code == 552 and "5.3.4 The message is too big" in answer.text, answer
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


async def test_line_over_1000_octets_500(relay: Harness, agent: Wire) -> None:
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(body=b"y" * 1200 + b"\r\n")))
    assert answer.code == 500 and "Line too long" in answer.text, answer
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


# -- SMTP smuggling and bare line ends

SMUGGLED = (
    f"MAIL FROM:<{AGENT}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
    f"From: {AGENT}\r\nTo: {VICTIM}\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
).encode()


SEPARATORS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


async def test_smuggled_end_of_data_is_refused_whole_550_560(relay: Harness, agent: Wire) -> None:
    for separator in SEPARATORS:
        assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        payload = raw_message(body=b"first message") + separator + SMUGGLED + b".\r\n"
        answer = await agent.data(payload)
        # One answer for the whole DATA: the fake end did not end it, and the smuggled
        # commands were never read as commands (they would each have had a reply).
        assert answer.lines == [
            "550 5.6.0 The message contains a bare CR or LF; lines must end with CRLF"
        ], separator
        assert (await agent.command("NOOP")).lines == ["250 2.0.0 OK"], separator
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)
    assert relay.sink.to(VICTIM) == []


BARE_LINE_ENDS = {
    "header-lf": raw_message(extra=("X-Note: one\nX-Injected: two",)),
    "header-cr": raw_message(extra=("X-Note: one\rX-Injected: two",)),
    "body-lf": raw_message(body=b"line one\nline two\r\n"),
    "body-cr": raw_message(body=b"line one\rline two\r\n"),
    "lf-before-crlf": raw_message(body=b"ends with a bare LF\n\r\n"),
    "cr-before-crlf": raw_message(body=b"ends with a bare CR\r\r\n"),
    "lf-at-the-end": raw_message() + b"\n",
    "cr-at-the-end": raw_message() + b"\r",
    # past the spool's first windows: found as the lines arrived, not by a second pass
    "deep-in-a-big-message": raw_message(body=(b"QUJD" * 19 + b"\r\n") * 8000 + b"bare\nLF\r\n"),
}


async def test_bare_cr_or_lf_anywhere_550_560(relay: Harness, agent: Wire) -> None:
    for case, raw in BARE_LINE_ENDS.items():
        assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        payload = raw + (b".\r\n" if raw.endswith(b"\r\n") else b"\r\n.\r\n")
        answer = await agent.data(payload)
        assert answer.code == 550 and answer.text.startswith("5.6.0 "), (case, answer)
        assert (await agent.command("NOOP")).lines == ["250 2.0.0 OK"], case
    await assert_nothing_written(relay)
    await send_sentinel(relay, agent)


# -- loops, local failures


async def test_thirty_received_headers_is_a_loop_554_546(relay: Harness, agent: Wire) -> None:
    assert relay.settings.smtp.max_received_headers == 30
    hops = tuple(f"Received: from hop{n}.example by hop{n + 1}.example" for n in range(30))
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    answer = await agent.data(dotted(raw_message(extra=hops)))
    assert answer.lines == ["554 5.4.6 Too many Received headers (30): a mail loop?"]
    await assert_nothing_written(relay)

    # one hop fewer still goes through
    assert (await agent.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await agent.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    assert (await agent.data(dotted(raw_message(extra=hops[1:])))).code == 250
    [copy] = await relay.sink.expect(1)
    assert len(headers.values(headers.fields_of(copy.data), "received")) == 30


async def test_local_failure_at_intake_451_and_nothing_half_written(
    relay: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(data: bytes) -> str:
        raise OSError(28, "No space left on device")

    # a message over [storage] inline_max_bytes, so that its original goes to the files
    monkeypatch.setattr(relay.relay.blob_health.blobs, "put_sync", disk_full)
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail(AGENT, [PROSPECT], raw_message(body=FILE_SIZED))
        assert refused.value.code == 451
        assert refused.value.message == (
            "4.3.0 The message was not accepted because of a local problem; try again"
        )
        await assert_nothing_written(relay)

        monkeypatch.undo()
        text = await submit(client, [PROSPECT], raw_message(body=FILE_SIZED))
    assert text.startswith("2.0.0 Ok: queued as ")
    await relay.sink.expect(1)
    assert await stored(relay) == (1, 1)


async def test_a_failed_commit_of_a_small_message_451_and_no_blob_left(
    relay: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small message's original is written in the commit's transaction: when that fails
    after the blob's INSERT, the blob goes with the rows."""

    def full(connection: Any, rows: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(bulk, "insert_rows", full)
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail(AGENT, [PROSPECT], raw_message())
        assert refused.value.code == 451
        await assert_nothing_written(relay)
        async with relay.relay.db.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(InlineBlob)) == 0
        monkeypatch.undo()
        text = await submit(client, [PROSPECT], raw_message())
    assert text.startswith("2.0.0 Ok: queued as ")
    await relay.sink.expect(1)
    async with relay.relay.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(InlineBlob)) == 1


# -- acceptance


async def test_a_subject_in_an_old_code_page_is_stored_readable(relay: Harness) -> None:
    """A scanner or an old client writes its Subject in Windows-1252, unencoded: the
    console, the journal and the prospect's page read it, the copy keeps its bytes."""
    raw = raw_message().replace(b"Subject: Ihr Expose", "Subject: Grüße, Exposé".encode("cp1252"))
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        text = await submit(client, [PROSPECT], raw)
    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(raw)
    async with relay.relay.db.transaction() as session:
        message = await session.get(Message, text.rsplit(" ", 1)[1])
    assert message is not None and message.subject == "Grüße, Exposé"


async def test_a_bcc_field_left_in_the_message_reaches_no_recipient(relay: Harness) -> None:
    """Some clients write the Bcc field into the message they submit: every recipient would
    read who else got it. Copies lose it (as Postfix's cleanup removes it), and a
    Return-Path that only a final delivery writes, signed without them; the stored original
    keeps them as the record of what the agent sent."""
    hidden = "buyer@example.net"
    raw = raw_message(
        extra=(
            f"Bcc: {hidden},\r\n boss@broker.example",
            "Resent-Bcc: boss@broker.example",
            "Return-Path: <boss@broker.example>",
        )
    )
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        text = await submit(client, [PROSPECT, hidden], raw)
    copies = await relay.sink.expect(1)
    assert sorted(r for copy in copies for r in copy.rcpt_tos) == sorted([PROSPECT, hidden])
    for copy in copies:
        names = {f.name for f in headers.fields_of(copy.data)}
        assert not names & {"bcc", "resent-bcc", "return-path"}, names
        assert hidden.encode() not in copy.data and b"boss@" not in copy.data
        verify_dkim(relay, copy.data)
    async with relay.relay.db.transaction() as session:
        message = await session.get(Message, text.rsplit(" ", 1)[1])
    assert message is not None
    assert await relay.relay.blobs.read(message.blob) == raw


async def test_queued_250_names_a_stored_message_with_its_journal(relay: Harness) -> None:
    recipients = [PROSPECT, "other@example.org"]
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        text = await submit(client, recipients, raw_message())
    match = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", text)
    assert match is not None, text
    message_id = match.group(1)

    async with relay.relay.db.transaction() as session:
        message = await session.get(Message, message_id)
        deliveries = (
            await session.scalars(select(Delivery).where(Delivery.message_id == message_id))
        ).all()
        events = (
            await session.scalars(
                select(Event).where(Event.message_id == message_id).order_by(Event.id)
            )
        ).all()
    assert message is not None
    assert message.sender == AGENT and message.protocol == "ESMTPSA"
    assert message.subject == "Ihr Expose"
    assert sorted(d.recipient for d in deliveries) == sorted(recipients)
    assert [e.type for e in events[:3]] == [
        "message.received",
        "delivery.queued",
        "delivery.queued",
    ]
    assert events[0].data["recipients"] == recipients
    assert {e.delivery_id for e in events[1:3]} == {d.id for d in deliveries}
    [copy] = await relay.sink.expect(1)
    assert sorted(copy.rcpt_tos) == sorted(recipients)


async def test_message_id_and_date_are_added_when_missing(relay: Harness) -> None:
    raw = raw_message()
    assert b"Message-ID" not in raw and b"Date" not in raw
    reply = await relay.send(raw, recipients=[PROSPECT])
    message_id = reply.rpartition(" ")[2]

    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(raw)
    fields = headers.fields_of(copy.data)
    async with relay.relay.db.transaction() as session:
        message = await session.get(Message, message_id)
    assert message is not None
    [msgid] = headers.values(fields, "message-id")
    assert msgid == message.message_id_header
    assert re.fullmatch(r"<[^<>@\s]+@relay\.broker\.example>", msgid)
    [date] = headers.values(fields, "date")
    assert parsedate_to_datetime(date) == message.received_at.replace(microsecond=0)
    assert {"message-id", "date"} <= set(signed_names(copy.data))
    verify_dkim(relay, copy.data)


async def test_message_id_and_date_are_kept_when_present(relay: Harness) -> None:
    raw = raw_message(
        extra=(
            "Message-ID: <kept.1234@broker.example>",
            "Date: Mon, 02 Mar 2026 09:00:00 +0100 (CET)",
            "X-Folded: first part\r\n\tsecond  part",
        )
    )
    reply = await relay.send(raw, recipients=[PROSPECT])
    message_id = reply.rpartition(" ")[2]

    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(raw), "the agent's bytes must leave untouched"
    fields = headers.fields_of(copy.data)
    assert headers.values(fields, "message-id") == ["<kept.1234@broker.example>"]
    assert headers.values(fields, "date") == ["Mon, 02 Mar 2026 09:00:00 +0100 (CET)"]
    async with relay.relay.db.transaction() as session:
        message = await session.get(Message, message_id)
    assert message is not None and message.message_id_header == "<kept.1234@broker.example>"
    verify_dkim(relay, copy.data)


# -- stopping ----------------------------------------------------------------------------------


async def test_a_stop_tells_an_idle_session_421_at_once(relay: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    assert (await reader.readline()).startswith(b"220 ")
    async with asyncio.timeout(5):  # no grace for a session between messages
        await relay.relay.stop()
        said = await reader.read()
    writer.close()
    assert said == (
        b"421 4.3.2 relay.broker.example The relay is stopping; try again in a moment\r\n"
    )


async def test_a_stop_answers_the_message_under_way_then_closes(relay: Harness) -> None:
    client = relay.client(username=AGENT, password=PASSWORD)
    await client.connect()
    await client.mail(AGENT)
    await client.rcpt(PROSPECT)
    stopping = asyncio.create_task(relay.relay.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done(), "the stop waits for the message under way"
    code, reply = await client.data(make_message(to=PROSPECT).as_bytes())
    assert code == 250 and reply.startswith("2.0.0 Ok: queued as "), reply
    async with asyncio.timeout(5):
        await stopping
    with pytest.raises(aiosmtplib.SMTPException):
        await client.noop()
    async with relay.relay.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 1


class RecordedWrites:
    """A session's transport that keeps what each write sent."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_a_multiline_reply_leaves_in_one_write(relay: Harness) -> None:
    """The EHLO reply's lines go out together: one send per reply, not one per extension;
    a pipelined batch of commands is answered in one send too."""
    wire = await Wire.open(relay.smtp_port)
    try:
        (session,) = relay.relay.smtp.gate.sessions
        recorded = session.transport = RecordedWrites(session.transport)
        offered = await wire.ehlo()
        assert len(offered.lines) >= 4, offered
        assert recorded.writes == ["".join(f"{line}\r\n" for line in offered.lines).encode()]

        recorded.writes.clear()
        assert (await wire.command("NOOP")).lines == ["250 2.0.0 OK"]
        assert recorded.writes == [b"250 2.0.0 OK\r\n"]

        recorded.writes.clear()
        await wire.write(b"NOOP\r\nNOOP\r\nNOOP\r\n")
        answers = [await wire.answer() for _ in range(3)]
        assert [a.lines for a in answers] == [["250 2.0.0 OK"], ["250 2.0.0 OK"], ["250 2.0.0 OK"]]
        assert recorded.writes == [b"250 2.0.0 OK\r\n" * 3]
    finally:
        await wire.close()
