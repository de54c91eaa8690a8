"""Trusted clients (`[[smtp.trusted]]`) through real connections: never an open relay.

Clients connect from different loopback source addresses (127.0.0.5 is inside the trusted
network, 127.0.0.9 outside), with client certificates from a test CA made here (and one
from another CA), over STARTTLS or in plain text. Every refusal is checked for its exact
reply and for nothing queued; every acceptance for the copy upstream and the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import shutil
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from gateway import users
from gateway.config import Settings, SmtpSettings, TrustedClient
from gateway.config_check import settings_problems
from gateway.fronts import trusted
from gateway.fronts.trusted import ClientFacts, TrustedEntry, match
from gateway.store.models import Delivery, Event, Message
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay
from tests.pki import Authority, Issued, tls_client
from tests.support import free_port

TIMEOUT = 15
INSIDE = "127.0.0.5"
OUTSIDE = "127.0.0.9"
CRM_HOST = "127.0.0.10"
CONNECTOR = "connector.mail.example"
PROSPECT = "prospect@example.com"
SERVED = "office@broker.example"  # no agent has it; broker.example is served
NOT_SERVED = "someone@elsewhere.example"


@dataclass(frozen=True)
class Pki:
    ca: Authority
    right: Issued
    wrong_name: Issued
    other_ca: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "test-ca")
    other = Authority(directory, "other-ca")
    return Pki(ca, ca.issue(CONNECTOR), ca.issue("intruder.example"), other.issue(CONNECTOR))


# -- a client that connects from a chosen loopback address


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
        )
        client = cls(reader, writer)
        assert (await client.reply()).startswith("220")
        return client

    async def reply(self) -> str:
        """The last line of the reply (the one that carries the text)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not line.endswith(b"\r\n"):
                raise ConnectionError(f"connection ended mid-reply: {line!r}")
            if line[3:4] != b"-":
                return line[:-2].decode()

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)
        return await self.reply()

    async def starttls(self, certificate: Issued | None) -> None:
        assert (await self.command("STARTTLS")).startswith("220")
        await asyncio.wait_for(self.writer.start_tls(tls_client(certificate)), TIMEOUT)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


def message(sender: str, *, attachment: bool = False) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = PROSPECT
    mail["Subject"] = "Ihr Exposé"
    mail.set_content("Guten Tag!\n")
    if attachment:
        mail.add_attachment(
            bytes(range(256)) * 20, maintype="application", subtype="pdf", filename="plan.pdf"
        )
    return mail.as_bytes(policy=email.policy.SMTP)


async def attempt(
    port: int,
    source: str,
    *,
    tls: bool,
    certificate: Issued | None,
    mail_from: str,
    author: str,
) -> str:
    """One message's conversation; the reply that ended it ("TLS refused" when the
    handshake failed)."""
    client = await Client.open(port, source)
    try:
        try:
            assert (await client.command("EHLO crm.example")).startswith("250")
            if tls:
                await client.starttls(certificate)
                ehlo = await client.command("EHLO crm.example")
                assert ehlo.startswith("250"), ehlo
        except (ssl.SSLError, ConnectionError):
            return "TLS refused"
        answer = await client.command(f"MAIL FROM:<{mail_from}>")
        if not answer.startswith("250"):
            return answer
        answer = await client.command(f"RCPT TO:<{PROSPECT}>")
        if not answer.startswith("250"):
            return answer
        answer = await client.command("DATA")
        if not answer.startswith("354"):
            return answer
        client.writer.write(message(author).replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return await client.reply()
    finally:
        await client.close()


async def stored(relay: Harness) -> tuple[int, int, int]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
        trusted = await session.scalar(
            select(func.count()).select_from(Event).where(Event.type == "message.trusted_client")
        )
    return messages or 0, deliveries or 0, trusted or 0


# -- the table


STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_REQUIRED = "530 5.7.0 Authentication required"


def expected(inside: bool, certificate: str, tls: bool, domain: str) -> str:
    if tls and certificate == "other CA":
        return "TLS refused"  # the listener asks for a certificate and cannot verify it
    if not (inside and tls and certificate == "right"):
        return AUTH_REQUIRED if tls else STARTTLS_FIRST  # today's answers
    if domain == "not served":
        return (
            "550 5.7.1 This client may send only for the domains this relay serves;"
            f" <{NOT_SERVED}> (MAIL FROM) is not in one of them"
        )
    if domain == "From differs":
        return (
            "550 5.7.1 This client may send only for the domains this relay serves;"
            f" <{NOT_SERVED}> (From header) is not in one of them"
        )
    return "250"


async def test_every_combination_of_address_certificate_tls_and_domain(
    relay_factory: StartRelay, pki: Pki
) -> None:
    relay = await relay_factory(
        smtp={
            "trusted": [
                {
                    "name": "m365",
                    "service": "Microsoft 365 connector",
                    "networks": ["127.0.0.4/31", "::1/128"],
                    "certificate_names": [CONNECTOR],
                    "client_ca": str(pki.ca.pem),
                    "require_tls": True,
                }
            ]
        }
    )
    certificates = {
        "none": None,
        "right": pki.right,
        "right CA, wrong name": pki.wrong_name,
        "other CA": pki.other_ca,
    }
    domains = {
        "served": (SERVED, SERVED),
        "not served": (NOT_SERVED, NOT_SERVED),
        "From differs": (SERVED, NOT_SERVED),
    }
    wrong = []
    accepted = 0
    for inside in (True, False):
        for name, certificate in certificates.items():
            for tls in (True, False):
                for domain, (mail_from, author) in domains.items():
                    case = (
                        f"{'inside' if inside else 'outside'}, cert {name},"
                        f" {'TLS' if tls else 'plain'}, {domain}"
                    )
                    before = await stored(relay)
                    got = await attempt(
                        relay.smtp_port,
                        INSIDE if inside else OUTSIDE,
                        tls=tls,
                        certificate=certificate,
                        mail_from=mail_from,
                        author=author,
                    )
                    want = expected(inside, name, tls, domain)
                    after = await stored(relay)
                    if want == "250":
                        accepted += 1
                        ok = got.startswith("250 2.0.0 Ok: queued as") and after == (
                            before[0] + 1,
                            before[1] + 1,
                            before[2] + 1,
                        )
                    else:
                        ok = got == want and after == before
                    if not ok:
                        wrong.append(f"{case}: got {got!r} {after}, wanted {want!r} {before}")
    assert wrong == [], "\n".join(wrong)
    assert accepted == 1
    [copy] = await relay.sink.expect(1)
    assert copy.rcpt_tos == [PROSPECT] and copy.mail_from == SERVED
    received = [v for k, v in _fields(copy.data) if k == "received"]
    assert (
        f"({INSIDE}) (trusted client Microsoft 365 connector, entry m365,"
        f" certificate {CONNECTOR}) by relay.broker.example (sealrelay) with ESMTPS id"
        in received[0]
    ), received
    async with relay.relay.db.transaction() as session:
        event = await session.scalar(select(Event).where(Event.type == "message.trusted_client"))
        message_row = await session.scalar(select(Message))
    assert event is not None and message_row is not None
    assert event.data == {
        "entry": "m365",
        "service": "Microsoft 365 connector",
        "peer": INSIDE,
        "certificate": CONNECTOR,
        "protocol": "ESMTPS",
    }
    assert message_row.user_id is None and message_row.protocol == "ESMTPS"


def _fields(data: bytes) -> list[tuple[str, str]]:
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(k.lower(), " ".join(str(v).split())) for k, v in parsed.items()]


async def test_agents_still_log_in_on_the_listener_that_asks_for_certificates(
    relay_factory: StartRelay, pki: Pki
) -> None:
    relay = await relay_factory(
        smtp={
            "trusted": [
                {
                    "name": "m365",
                    "networks": ["127.0.0.4/31"],
                    "certificate_names": [CONNECTOR],
                    "client_ca": str(pki.ca.pem),
                }
            ]
        }
    )
    # from inside the network, without a certificate: no entry matches, so AUTH it is
    async with relay.client(source_address=(INSIDE, 0), username=AGENT, password=PASSWORD) as agent:
        response = await agent.send_message(_agent_message())
    assert response[1].startswith("2.0.0 Ok: queued as")
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO agent.example")).startswith("250")
        await client.starttls(None)
        assert (await client.command("EHLO agent.example")).startswith("250")
        assert await client.command(f"MAIL FROM:<{AGENT}>") == AUTH_REQUIRED
    finally:
        await client.close()
    [copy] = await relay.sink.expect(1)
    assert copy.mail_from == AGENT


def _agent_message() -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = AGENT
    mail["To"] = PROSPECT
    mail["Subject"] = "Exposé"
    mail.set_content("Guten Tag!\n")
    return mail


async def test_crm_by_address_on_its_own_listener_maps_agents_to_their_group(
    relay_factory: StartRelay,
) -> None:
    crm_port = free_port()
    relay = await relay_factory(
        smtp={
            "allow_plaintext_auth_on_loopback": False,
            "trusted": [
                {
                    "name": "crm",
                    "service": "Makler-CRM",
                    "networks": [f"{CRM_HOST}/32"],
                    "listen": [f"127.0.0.1:{crm_port}"],
                    "map_agents": True,
                }
            ],
        },
        groups=[{"name": "linkers", "link_attachments_over": 1000}],
    )
    mapped = "mapped@broker.example"
    await users.add_user(relay.relay.db, mapped, PASSWORD, group="linkers")
    for sender in (mapped, SERVED):
        client = await Client.open(crm_port, CRM_HOST)
        try:
            assert (await client.command("EHLO crm.example")).startswith("250")
            assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
            assert (await client.command(f"RCPT TO:<{PROSPECT}>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            client.writer.write(message(sender, attachment=True) + b".\r\n")
            assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
        finally:
            await client.close()
    copies = await relay.sink.expect(2)
    by_sender = {c.mail_from: email.message_from_bytes(c.data) for c in copies}
    linked = [p.get_filename() for p in by_sender[mapped].walk()]
    kept = [p.get_filename() for p in by_sender[SERVED].walk()]
    assert "plan.pdf" not in linked and b"/d/" in by_sender[mapped].as_bytes()
    assert "plan.pdf" in kept
    async with relay.relay.db.transaction() as session:
        rows = {m.sender: m for m in (await session.scalars(select(Message))).all()}
    agent = await users.agent_by_address(relay.relay.db, mapped)
    assert agent is not None
    assert rows[mapped].user_id == agent.user_id and rows[mapped].protocol == "ESMTP"
    assert rows[SERVED].user_id is None
    # another address on the CRM's listener is an unknown client: AUTH, as everywhere
    client = await Client.open(crm_port, OUTSIDE)
    try:
        assert (await client.command("EHLO crm.example")).startswith("250")
        assert await client.command(f"MAIL FROM:<{SERVED}>") == STARTTLS_FIRST
    finally:
        await client.close()
    assert (await stored(relay))[:2] == (2, 2)


async def test_entry_domains_narrow_what_a_trusted_client_may_send_for(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(
        smtp={
            "trusted": [
                {"name": "scanner", "networks": [f"{INSIDE}/32"], "domains": ["other.example"]}
            ]
        }
    )
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO scanner.example")).startswith("250")
        # broker.example is served, but not by this entry; other.example is listed but
        # nobody here serves it
        for sender in (SERVED, "scan@other.example"):
            answer = await client.command(f"MAIL FROM:<{sender}>")
            assert answer.startswith("550 5.7.1 "), answer
    finally:
        await client.close()
    assert await stored(relay) == (0, 0, 0)


async def test_served_domains_are_kept_between_messages_and_read_again_when_needed(
    relay_factory: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new alias's domain may send at once; a removed one is refused once the kept set is
    older than FRESH; in between, MAIL FROM reads no user table."""
    relay = await relay_factory(
        smtp={"trusted": [{"name": "scanner", "networks": [f"{INSIDE}/32"]}]}
    )
    served = relay.relay.smtp.handler.served
    now = [1000.0]
    served.clock = lambda: now[0]
    reads = []
    real = trusted.served_domains

    async def counted(settings: Settings, db: object) -> frozenset[str]:
        reads.append(now[0])
        return await real(settings, db)  # type: ignore[arg-type]

    monkeypatch.setattr(trusted, "served_domains", counted)
    scan = "scan@newly.example"
    refused = (
        "550 5.7.1 This client may send only for the domains this relay serves;"
        f" <{scan}> (MAIL FROM) is not in one of them"
    )
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO scanner.example")).startswith("250")

        async def mail(sender: str) -> str:
            answer = await client.command(f"MAIL FROM:<{sender}>")
            assert (await client.command("RSET")).startswith("250")
            return answer

        assert await mail(scan) == refused
        await users.add_alias(relay.relay.db, AGENT, "desk@newly.example", by="test")
        assert (await mail(scan)).startswith("250")
        read = len(reads)
        for _ in range(3):
            assert (await mail(SERVED)).startswith("250")
            assert (await mail(scan)).startswith("250")
        assert len(reads) == read  # kept: no reads for served domains

        await users.remove_alias(relay.relay.db, AGENT, "desk@newly.example", by="test")
        assert (await mail(scan)).startswith("250")  # still within FRESH
        now[0] += served.FRESH + 1
        assert await mail(scan) == refused
        assert (await mail(SERVED)).startswith("250")
    finally:
        await client.close()
    assert await stored(relay) == (0, 0, 0)


async def test_served_domains_that_cannot_be_read_are_a_451_and_the_session_goes_on(
    relay_factory: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read behind a trusted client's first MAIL FROM fails (the database is away): the
    client hears 451 and may try again in the same session, where the read then succeeds
    and the sender and recipient are taken."""
    relay = await relay_factory(
        smtp={"trusted": [{"name": "scanner", "networks": [f"{INSIDE}/32"]}]}
    )
    real = trusted.served_domains

    async def away(settings: Settings, db: object) -> frozenset[str]:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(trusted, "served_domains", away)
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO scanner.example")).startswith("250")
        assert await client.command(f"MAIL FROM:<{SERVED}>") == (
            "451 4.3.0 A local problem; try again later"
        )
        monkeypatch.setattr(trusted, "served_domains", real)
        assert (await client.command(f"MAIL FROM:<{SERVED}>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{PROSPECT}>")).startswith("250")
    finally:
        await client.close()
    assert await stored(relay) == (0, 0, 0)


@pytest.mark.slow
async def test_swaks_sends_as_a_trusted_host_without_auth(relay_factory: StartRelay) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.fail("swaks is not installed: apt-get install -y swaks", pytrace=False)
    relay = await relay_factory(
        smtp={"trusted": [{"name": "printer", "networks": [f"{INSIDE}/32"]}]}
    )
    common = [
        "--server",
        f"127.0.0.1:{relay.smtp_port}",
        "--local-interface",
        INSIDE,
        "--to",
        PROSPECT,
        "--header",
        "Subject: Scan",
        "--body",
        "Gescanntes Dokument",
        "--timeout",
        "20",
    ]
    process = await asyncio.create_subprocess_exec(
        swaks,
        *common,
        "--from",
        SERVED,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    transcript = out.decode(errors="replace")
    assert process.returncode == 0, transcript
    assert "250 2.0.0 Ok: queued as" in transcript
    [copy] = await relay.sink.expect(1)
    assert copy.mail_from == SERVED
    process = await asyncio.create_subprocess_exec(
        swaks,
        *common,
        "--from",
        NOT_SERVED,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    transcript = out.decode(errors="replace")
    assert process.returncode != 0
    assert "<** 550 5.7.1 This client may send only for the domains" in transcript, transcript
    assert (await stored(relay))[:2] == (1, 1)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "x", "networks": ["10.0.0.300/8"]}, "is not an IP address or network"),
        ({"name": "x", "networks": []}, "at least 1 item"),
        ({"name": "x", "networks": ["10.0.0.0/8"], "certificate_names": ["a"]}, "needs client_ca"),
        ({"name": "x", "networks": ["10.0.0.0/8"], "listen": ["nohost"]}, "is not HOST:PORT"),
        ({"name": "x", "networks": ["10.0.0.0/8"], "require_tls": True}, "need tls_cert"),
    ],
)
def test_bad_entries_stop_start_up_naming_the_key(entry: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        SmtpSettings.model_validate({"trusted": [entry]})
    assert problem in str(raised.value)


def test_entry_names_are_unique() -> None:
    entry = {"name": "crm", "networks": ["10.0.0.0/8"]}
    with pytest.raises(ValidationError, match="repeated: crm"):
        SmtpSettings.model_validate({"trusted": [entry, entry]})


def test_a_client_ca_without_certificates_stops_start_up(tmp_path: Path) -> None:
    empty = tmp_path / "ca.pem"
    empty.write_text("not a certificate\n")
    entry = TrustedClient(name="m365", networks=["10.0.0.0/8"], client_ca=empty)
    with pytest.raises(RuntimeError, match=r"smtp\.trusted m365: client_ca .*no PEM certificates"):
        TrustedEntry.load(entry)
    with pytest.raises(RuntimeError, match="cannot read"):
        TrustedEntry.load(entry.model_copy(update={"client_ca": tmp_path / "missing.pem"}))


def test_check_config_names_an_unusable_client_ca(
    tmp_path: Path, tls_files: tuple[Path, Path], pki: Pki
) -> None:
    cert, key = tls_files
    settings = Settings.model_validate(
        {
            "smtp": {
                "tls_cert": str(cert),
                "tls_key": str(key),
                "trusted": [
                    {"name": "good", "networks": ["10.0.0.0/8"], "client_ca": str(pki.ca.pem)},
                    {"name": "gone", "networks": ["10.0.0.0/8"], "client_ca": str(tmp_path)},
                ],
            }
        }
    )
    found = [str(p) for p in settings_problems(settings) if p.key == "smtp.trusted"]
    assert found == [f"smtp.trusted: gone: client_ca {tmp_path}: cannot read: Is a directory"]


async def test_a_certificate_from_another_entrys_ca_does_not_match(
    relay_factory: StartRelay, tmp_path: Path, pki: Pki
) -> None:
    """Both CAs are trusted by the listener's TLS; the name must come from the entry's own."""
    google = Authority(tmp_path, "google-ca")
    relay = await relay_factory(
        smtp={
            "trusted": [
                {
                    "name": "m365",
                    "networks": ["127.0.0.4/31"],
                    "certificate_names": [CONNECTOR],
                    "client_ca": str(pki.ca.pem),
                },
                {
                    "name": "google",
                    "networks": ["127.0.0.4/31"],
                    "certificate_names": ["relay.google.example"],
                    "client_ca": str(google.pem),
                },
            ]
        }
    )
    forged = google.issue(CONNECTOR)  # google's CA, m365's name
    got = await attempt(
        relay.smtp_port, INSIDE, tls=True, certificate=forged, mail_from=SERVED, author=SERVED
    )
    assert got == AUTH_REQUIRED
    assert await stored(relay) == (0, 0, 0)
    got = await attempt(
        relay.smtp_port,
        INSIDE,
        tls=True,
        certificate=google.issue("relay.google.example"),
        mail_from=SERVED,
        author=SERVED,
    )
    assert got.startswith("250 2.0.0 Ok: queued as")
    async with relay.relay.db.transaction() as session:
        event = await session.scalar(select(Event).where(Event.type == "message.trusted_client"))
    assert event is not None and event.data["entry"] == "google"


def _entry(**values: object) -> TrustedEntry:
    return TrustedEntry.load(TrustedClient.model_validate({"name": "e", **values}))


@pytest.mark.parametrize(
    ("networks", "peer", "matches"),
    [
        (["2001:db8::/32"], "2001:db8::7", True),
        (["2001:db8::/32"], "2001:db9::7", False),
        (["192.0.2.0/24"], "::ffff:192.0.2.7", True),  # a dual-stack listener's view of v4
        (["192.0.2.0/24"], "192.0.3.7", False),
        (["192.0.2.0/24"], "", False),
        (["192.0.2.0/24"], "not-an-address", False),
    ],
)
def test_networks_match_v4_v6_and_mapped_addresses(
    networks: list[str], peer: str, matches: bool
) -> None:
    found = match([_entry(networks=networks)], ClientFacts(peer, tls=False))
    assert (found is not None) == matches


def test_require_tls_alone_needs_tls_and_no_certificate() -> None:
    entry = _entry(networks=["192.0.2.0/24"], require_tls=True)
    assert match([entry], ClientFacts("192.0.2.7", tls=False)) is None
    found = match([entry], ClientFacts("192.0.2.7", tls=True))
    assert found is not None and found.certificate_name is None


async def test_a_trusted_client_keeps_the_recipient_and_size_limits(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(smtp={"trusted": [{"name": "crm", "networks": [f"{INSIDE}/32"]}]})
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO crm.example")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SERVED}>")).startswith("250")
        for n in range(5):
            assert (await client.command(f"RCPT TO:<p{n}@example.com>")).startswith("250")
        too_many = await client.command("RCPT TO:<p5@example.com>")
        assert too_many == "452 4.5.3 Too many recipients; at most 5 per message"
        assert (await client.command("DATA")).startswith("354")
        big = message(SERVED) + b"x" * 1100 * 1024 + b"\r\n"
        client.writer.write(big.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        too_big = await client.reply()
        assert too_big == ("552 5.3.4 The message is too big; at most 1048576 bytes are accepted")
    finally:
        await client.close()
    assert await stored(relay) == (0, 0, 0)


async def test_a_trusted_client_relays_null_sender_mail_checked_by_its_from_header(
    relay_factory: StartRelay,
) -> None:
    """An auto-reply, a DSN or a read receipt comes with MAIL FROM:<> (RFC 3834, 3464,
    8098): a connector relays it as any other mail of a served domain's, the upstream gets
    the null sender, and a failure bounces to nobody. Its From header decides."""
    relay = await relay_factory(smtp={"trusted": [{"name": "crm", "networks": [f"{INSIDE}/32"]}]})
    for connection in range(2):  # the served domains read once, then kept
        answer = await attempt(
            relay.smtp_port, INSIDE, tls=False, certificate=None, mail_from="", author=SERVED
        )
        assert answer.startswith("250 2.0.0 Ok: queued"), (connection, answer)
    copies = await relay.sink.expect(2)
    assert [(c.mail_from, c.rcpt_tos) for c in copies] == [("<>", [PROSPECT])] * 2

    outside = await attempt(
        relay.smtp_port, INSIDE, tls=False, certificate=None, mail_from="", author=NOT_SERVED
    )
    assert outside.startswith("550 5.7.1 ") and f"<{NOT_SERVED}> (From header)" in outside
    assert await stored(relay) == (2, 2, 2)
