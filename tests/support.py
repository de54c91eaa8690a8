"""Real test doubles at the edge: a recording SMTP sink, certificates, free ports."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from gateway.store import events
from gateway.store.db import Database
from gateway.store.journal import ChainReport, verify_database
from gateway.store.models import Event
from gateway.store.sequencer import chain_all
from tests.chunking_smtp import ChunkedEnvelope, ChunkingSMTP


def screenshot_dir(suite: str) -> Path:
    """Where browser tests keep their screenshots, so a person can open and read them.

    `var/screenshots/<suite>/` in the checkout unless SEALRELAY_SCREENSHOTS names another root.
    """
    root = Path(
        os.environ.get("SEALRELAY_SCREENSHOTS", Path(__file__).parent.parent / "var/screenshots")
    )
    directory = root / suite
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# What a config file needs for the letter texts' placeholders, or serve refuses to start.
BRANDING_TOML = """
[branding]
company_name = "Müller Immobilien GmbH"
"""
LETTER_VALUES_TOML = """
[letter]
company_address = "Musterstraße 1, 80331 München"
company_email = "widerruf@broker.example"
company_phone = "+49 89 123456"
commission = "3,57 % des Kaufpreises inkl. MwSt."
"""
LETTER_TOML = BRANDING_TOML + LETTER_VALUES_TOML


def serve_config(
    directory: Path, *, smtp_port: int, database_url: str, extra: dict[str, str] | None = None
) -> Path:
    """`directory/relay.toml` for a `sealrelay serve` process: plaintext AUTH on loopback,
    a capture upstream in `directory/outbox`, the letter values serve needs. `extra` adds
    lines to a section ("smtp", "database", ...), or a new section."""
    lines = {
        "server": ['hostname = "relay.test.example"'],
        "smtp": [f'listen = ["127.0.0.1:{smtp_port}"]', "allow_plaintext_auth_on_loopback = true"],
        "web": [f'listen = "127.0.0.1:{free_port()}"'],
        "upstream": [f'url = "capture:{directory / "outbox"}"'],
        "database": [f'url = "{database_url}"'],
        "storage": [f'path = "{directory / "blobs"}"'],
        "loop": [f'key_file = "{directory / "loop.key"}"'],
    }
    for section, more in (extra or {}).items():
        lines.setdefault(section, []).extend(more.strip().splitlines() if more.strip() else [])
    config = directory / "relay.toml"
    config.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{line}\n" for line in body)
            for section, body in lines.items()
        )
        + LETTER_TOML,
        encoding="utf-8",
    )
    return config


_PORTS = random.Random()
_GIVEN: set[int] = set()


def _own_ports() -> range:
    """This process's share of 20000-31999: each pytest-xdist worker has its own, so two
    workers never hand out the same port between one's check and its test's bind."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    share = 12000 // workers
    return range(20000 + index * share, 20000 + (index + 1) * share)


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768-60999 here).

    A port the kernel hands out for bind(0) is also one it may hand to the next outgoing
    connection before the test binds it; the suite opens thousands, so that race was real
    ("address already in use" at a relay's start). Ports below the range are never given
    out by the kernel, only taken by us; each is handed out once per run.
    """
    ports = _own_ports()
    for _ in range(200):
        port = _PORTS.choice(ports)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} after 200 tries")


def make_certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False  # it came over STARTTLS
    chunks: int = 0  # the BDAT chunks it came in; 0: it came by DATA
    smtputf8: bool = False  # MAIL asked for SMTPUTF8 (RFC 6531)


class CountingSMTP(ChunkingSMTP):
    """aiosmtpd's server, telling its sink when a connection opens and closes."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self.sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.sink.connected_once(self):
            self.sink.open_connections += 1
            self.sink.most_connections = max(self.sink.most_connections, self.sink.open_connections)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self in self.sink._counted:  # STARTTLS calls it again for the same connection
            self.sink._counted.discard(self)
            self.sink.open_connections -= 1
        super().connection_lost(error)


@dataclass
class Sink:
    """An upstream SMTP server that records what it got and can be told to refuse."""

    port: int = 0
    messages: list[Received] = field(default_factory=list)
    # recipient -> reply; "421 ..." style temporary or "550 ..." permanent refusals at RCPT
    refuse: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    host: str = "127.0.0.1"
    tls_context: ssl.SSLContext | None = None  # offers STARTTLS with it
    hold: asyncio.Event | None = None  # DATA waits for it; `held` counts the waiting
    held: int = 0
    open_connections: int = 0
    most_connections: int = 0  # open at the same time, at most
    pipelining: bool = False  # offers PIPELINING (RFC 2920)
    chunking: bool = False  # offers CHUNKING: takes BDAT (RFC 3030)
    smtputf8: bool = False  # offers SMTPUTF8: takes UTF-8 addresses (RFC 6531)
    protocol: ClassVar[type[CountingSMTP]] = CountingSMTP  # each connection's server
    _counted: set[SMTP] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def connected_once(self, server: SMTP) -> bool:
        """Whether `server`'s connection was counted already (STARTTLS makes it again)."""
        if server in self._counted:
            return True
        self._counted.add(server)
        return False

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
    ) -> list[str]:
        session.host_name = hostname
        offered = [("PIPELINING", self.pipelining), ("CHUNKING", self.chunking)]
        return [*lines[:-1], *(f"250-{name}" for name, on in offered if on), lines[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hold is not None:
            async with self._changed:
                self.held += 1
                self._changed.notify_all()
            await self.hold.wait()
        if self.data_reply:
            return self.data_reply
        assert envelope.original_content is not None and envelope.mail_from is not None
        async with self._changed:
            self.messages.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    tls=session.ssl is not None,
                    chunks=envelope.chunks if isinstance(envelope, ChunkedEnvelope) else 0,
                    smtputf8=envelope.smtp_utf8,
                )
            )
            self._changed.notify_all()
        return "250 OK stored"

    async def start(self, port: int | None = None) -> Sink:
        loop = asyncio.get_running_loop()
        self.port = port or self.port or free_port()

        def make() -> SMTP:
            return self.protocol(
                self,
                hostname="sink.test",
                decode_data=False,
                data_size_limit=None,
                tls_context=self.tls_context,
                enable_SMTPUTF8=self.smtputf8,
            )

        self._server = await loop.create_server(make, self.host, self.port)
        return self

    async def wait_held(self, count: int, timeout: float = 30) -> None:
        """Until `count` conversations wait in DATA for `hold`."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: self.held >= count)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def expect(self, count: int, timeout: float = 30) -> list[Received]:
        """Wait until `count` copies arrived (bounded), then return them all."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)

    def where(self, predicate: Callable[[Received], bool]) -> list[Received]:
        return [m for m in self.messages if predicate(m)]

    def to(self, address: str) -> list[Received]:
        return self.where(lambda m: address in m.rcpt_tos)


async def undeclared_event_types(db: Database) -> list[str]:
    """The event types the test's journal holds that gateway/store/events.py does not declare.

    Every database test's teardown asks, so each end-to-end flow of the suite proves that
    whatever it journaled is in the catalog, on both backends.
    """
    async with db.transaction() as session:
        stored = (await session.scalars(select(Event.type).distinct())).all()
    return sorted(set(stored) - set(events.CATALOG))


async def wait_for_port(
    port: int, process: asyncio.subprocess.Process, what: str = "serve"
) -> None:
    """Until the process (a `serve` by default) listens on `port`; at once an error if it
    exited instead."""
    async with asyncio.timeout(30):
        while True:
            if process.returncode is not None:
                raise AssertionError(f"{what} exited early with {process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return


# A person's browser: the test clients send it unless a test names another user agent, since
# aiohttp's own ("Python/3.11 aiohttp/...") is rightly taken for a link scanner.
PERSON_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


async def chained(db: Database) -> ChainReport:
    """The journal's chain verified once every event written so far is chained: what a
    relay's sequencer does within `database.chain_interval`, done at once."""
    await chain_all(db)
    return await verify_database(db)


async def run_process(*argv: str, timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """A command's exit status and output (stdout and stderr together); past `timeout`
    seconds it is killed and TimeoutError raised, so no process outlives its test."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8", errors="replace")
