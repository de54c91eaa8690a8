"""Fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL is required, not optional: without it these tests fail instead of skipping.
Point SEALRELAY_TEST_POSTGRES_URL elsewhere if it is not on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from argon2 import PasswordHasher
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from gateway import users
from gateway.config import Settings
from gateway.mail import dkim
from gateway.mail.outgoing import Signer
from gateway.store.db import Database, make_engine
from sealrelay.serve import ROLES, Relay
from tests import db_templates, task_dump
from tests.support import Sink, free_port, make_certificate, undeclared_event_types

POSTGRES_URL = os.environ.get(
    "SEALRELAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
AGENT = "agent@broker.example"
ALIAS = "team@broker.example"
PASSWORD = "correct horse battery"
DKIM_DOMAIN = "broker.example"
DKIM_SELECTOR = "s2026"
RELAY_HASHER = users._hasher
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

pytest_plugins = ["tests.letter_fixtures", "tests.s3_server"]


task_dump.install()


@pytest.fixture(autouse=True, scope="session")
def cheap_password_hashes() -> Iterator[None]:
    """Passwords hashed in these tests use argon2's smallest cost, as Django advises for test
    runs: at the relay's cost every user added and every login checked took 70-180 ms here.
    A stored hash carries its parameters, so checks follow whatever a test stored; the
    relay's own parameters are checked in tests/relay/test_users.py, and relays started as
    processes (`sealrelay serve`) use them throughout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users, "_hasher", CHEAP_HASHER)
        users._dummy_hash.cache_clear()
        yield
    users._dummy_hash.cache_clear()


@pytest.fixture
def relay_password_cost(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The relay's own argon2 parameters, for the tests that check them."""
    monkeypatch.setattr(users, "_hasher", RELAY_HASHER)
    users._dummy_hash.cache_clear()
    yield
    users._dummy_hash.cache_clear()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return db_templates.migrated_sqlite(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(scope="session")
def postgres_migrations() -> db_templates.Statements:
    return db_templates.migration_statements(POSTGRES_URL)


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database of the test's own: a copy of the run's template (db_templates)."""
    if request.param == "sqlite":
        db_templates.copy_sqlite(request.getfixturevalue("sqlite_template"), tmp_path / "relay.db")
        db = Database.connect(f"sqlite+aiosqlite:///{tmp_path}/relay.db")
        yield db
        undeclared = await undeclared_event_types(db)
        await db.close()
        assert undeclared == [], (
            f"journaled but not declared in gateway/store/events.py: {undeclared}"
        )
        return
    schema = f"test_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_URL)
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {schema}"))
    except (OSError, SQLAlchemyError) as exc:
        await admin.dispose()
        pytest.fail(
            f"PostgreSQL is required for the tests and is not reachable at {POSTGRES_URL}:"
            f" {exc}. Start it or set SEALRELAY_TEST_POSTGRES_URL.",
            pytrace=False,
        )
    db = Database.connect(POSTGRES_URL, schema=schema)
    try:
        await db_templates.replay(db, request.getfixturevalue("postgres_migrations"))
        yield db
        undeclared = await undeclared_event_types(db)
        assert undeclared == [], (
            f"journaled but not declared in gateway/store/events.py: {undeclared}"
        )
    finally:
        await db.close()
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own for the relay process: a file, or a fresh PostgreSQL database.

    PostgreSQL is required: if it cannot be reached, the test fails.
    """
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/relay.db"
        return
    url = make_url(POSTGRES_URL)
    name = f"sealrelay_dur_{secrets.token_hex(6)}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def dkim_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "key.pem"
    dkim.write_private_key(dkim.generate_private_key(), path)
    return path


@pytest.fixture(scope="session")
def dkim_key(dkim_key_file: Path) -> dkim.DkimKey:
    return dkim.DkimKey.load(DKIM_DOMAIN, DKIM_SELECTOR, dkim_key_file)


def dkim_dns(key: dkim.DkimKey) -> Any:
    """A dnsfunc for dkimpy that answers only for our selector, offline."""
    record = dkim.public_txt_value(key).encode()

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return record if name == f"{key.selector}._domainkey.{key.domain}.".encode() else b""

    return lookup


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = await Sink().start()
    yield server
    await server.stop()


def relay_settings(tmp_path: Path, upstream_port: int, **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {"hostname": "relay.broker.example", "public_url": "http://127.0.0.1:8080"},
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"]},
        "web": {"listen": f"127.0.0.1:{free_port()}"},
        "upstream": {
            "url": f"smtp://127.0.0.1:{upstream_port}",
            "verify_tls": False,
            "timeout": 10,
            "retry_base": 0.2,
            "retry_max": 1,
        },
        "storage": {"path": str(tmp_path / "blobs")},
        "loop": {"key_file": str(tmp_path / "loop.key")},
        "worker": {"poll_seconds": 0.2},
        # no test asks the machine's DNS; the DKIM page's tests bring their own server
        "console": {"dns_checks": False},
        # the letter texts' placeholders need values, or the relay refuses to start
        "branding": {"company_name": "Müller Immobilien GmbH"},
        "letter": {
            "company_address": "Musterstraße 1, 80331 München",
            "company_email": "widerruf@broker.example",
            "company_phone": "+49 89 123456",
            "commission": "3,57 % des Kaufpreises inkl. MwSt.",
        },
    }
    for section, values in sections.items():
        if isinstance(values, list):  # [[groups]], [[rules]]
            data[section] = values
        else:
            data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)


@dataclass
class Harness:
    relay: Relay
    sink: Sink
    settings: Settings
    dkim_key: dkim.DkimKey

    @property
    def smtp_port(self) -> int:
        return self.relay.smtp.ports[0]

    @property
    def tls_port(self) -> int:
        return self.relay.smtp.ports[-1]

    @property
    def web_url(self) -> str:
        return f"http://{self.settings.web.listen}"

    def client(self, **kwargs: Any) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.smtp_port,
            start_tls=True,
            validate_certs=False,
            timeout=15,
            **kwargs,
        )

    async def send(
        self,
        message: EmailMessage | bytes,
        *,
        sender: str = AGENT,
        recipients: list[str] | None = None,
    ) -> str:
        """Send as the agent over STARTTLS + AUTH; returns the 250 reply text."""
        async with self.client(username=AGENT, password=PASSWORD) as client:
            if isinstance(message, EmailMessage):
                response = await client.send_message(message, sender=sender, recipients=recipients)
            else:
                assert recipients is not None
                response = await client.sendmail(sender, recipients, message)
        return response[1]


def make_message(
    to: str = "prospect@example.com", subject: str = "Ihr Exposé", body: str = "Guten Tag!\n"
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message


StartRelay = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def relay_factory(
    database: Database,
    sink: Sink,
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    dkim_key: dkim.DkimKey,
    dkim_key_file: Path,
) -> AsyncIterator[StartRelay]:
    """Starts a full relay (TLS, DKIM, the agent) with any settings sections on top."""
    started: list[Relay] = []
    await users.add_user(database, AGENT, PASSWORD, aliases=(ALIAS,))

    async def start(
        roles: Collection[str] = ROLES, *, singletons: bool = True, **sections: dict[str, Any]
    ) -> Harness:
        """`singletons=False`: as process 1 of `--processes N`, no sweep nor notices round."""
        cert, key = tls_files
        smtp = {
            "tls_cert": str(cert),
            "tls_key": str(key),
            "implicit_tls_listen": [f"127.0.0.1:{free_port()}"],
            "max_recipients": 5,
            "max_message_size": 1024 * 1024,
            **sections.pop("smtp", {}),
        }
        settings = relay_settings(
            tmp_path,
            sink.port,
            smtp=smtp,
            dkim={
                DKIM_DOMAIN: {"selector": DKIM_SELECTOR, "key_file": str(dkim_key_file)},
                **sections.pop("dkim", {}),
            },
            **sections,
        )
        relay = Relay(settings, roles=roles, db=database, signer=Signer({DKIM_DOMAIN: dkim_key}))
        if await relay.prepare():
            await relay.start_roles(singletons=singletons)
        started.append(relay)
        return Harness(relay, sink, settings, dkim_key)

    try:
        yield start
    finally:
        for relay in started:
            await relay.stop()


@pytest.fixture
async def relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory()
