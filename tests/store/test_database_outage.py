"""The relay while PostgreSQL is away: clients get temporary codes and no internals, start-up
waits for the database instead of exiting.

The outage is real: the relay reaches PostgreSQL through a TCP forwarder that these tests
stop (listener and live connections) and start again on the same port. SQLite is embedded
and cannot be away on its own, so these tests run on PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import smtplib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from gateway import users
from gateway.store.db import Database, make_engine
from sealrelay.serve import Relay
from tests.conftest import AGENT, PASSWORD, POSTGRES_URL, relay_settings
from tests.fronts.test_smtp_front import (
    PROSPECT,
    Wire,
    plain_token,
    raw_message,
)
from tests.support import Sink, free_port, serve_config, wait_for_port

SEALRELAY = str(Path(sys.executable).parent / "sealrelay")
POSTGRES = make_url(POSTGRES_URL)


class Forwarder:
    """A TCP port that leads to PostgreSQL while started and to nothing while stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return POSTGRES.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                POSTGRES.host or "127.0.0.1", POSTGRES.port or 5432
            )
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, upstream_writer))
        await asyncio.gather(
            _pump(reader, upstream_writer), _pump(upstream_reader, writer), return_exceptions=True
        )
        for end in (writer, upstream_writer):
            self._pipes.discard(end)
            end.transport.abort()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while chunk := await source.read(65536):
        sink.write(chunk)
        await sink.drain()
    sink.transport.abort()


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    forward = Forwarder(free_port())
    await forward.start()
    yield forward
    await forward.stop()


@pytest.fixture
async def outage_relay(forwarder: Forwarder, sink: Sink, tmp_path: Path) -> AsyncIterator[Relay]:
    """A relay on its own PostgreSQL schema, reached through the forwarder."""
    schema = f"test_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    db = Database.connect(forwarder.url, schema=schema)
    relay = Relay(
        relay_settings(tmp_path, sink.port, smtp={"allow_plaintext_auth_on_loopback": True}),
        db=db,
    )
    try:
        await db.upgrade()
        await users.add_user(db, AGENT, PASSWORD)
        await relay.start()
        yield relay
    finally:
        await relay.stop()
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


def internals_in(reply: str, forwarder: Forwarder) -> list[str]:
    """What a client or a public page must never see of the relay's insides."""
    secrets_ = [str(forwarder.port), "127.0.0.1", "postgres", "sqlalchemy", "Error", "Errno"]
    return [word for word in secrets_ if word in reply]


async def test_auth_during_a_database_outage_is_454_and_the_log_has_the_detail(
    outage_relay: Relay, forwarder: Forwarder, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    port = outage_relay.smtp.ports[0]
    await forwarder.stop()
    wire = await Wire.open(port)
    try:
        await wire.ehlo()
        answer = await wire.command(f"AUTH PLAIN {plain_token()}")
        assert answer.lines == ["454 4.7.0 Temporary authentication failure; try again later"]
        assert internals_in(answer.text, forwarder) == []
        # the database's words went to the log, for whoever runs the relay
        details = [
            r.getMessage() for r in caplog.records if "cannot check the login" in r.getMessage()
        ]
        assert details and "connect" in details[0].lower(), details

        await forwarder.start()
        assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
        assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        assert (await wire.data(raw_message() + b".\r\n")).code == 250
    finally:
        await wire.close()
    await sink.expect(1)


async def test_healthz_tells_the_public_only_that_the_database_is_unavailable(
    outage_relay: Relay, forwarder: Forwarder, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://{outage_relay.settings.web.listen}/healthz"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(url) as response:
            assert response.status == 200
        await forwarder.stop()
        async with http.get(url) as response:
            assert response.status == 503
            body = await response.text()
        assert await response.json() == {"status": "error", "database": "unavailable"}
        assert internals_in(body, forwarder) == []
        assert any(
            "connect" in r.getMessage().lower()
            for r in caplog.records
            if r.name == "web.app" and r.levelno >= logging.WARNING
        )
        await forwarder.start()
        async with http.get(url) as response:
            assert response.status == 200


# -- start-up


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A database of its own, for a `serve` process that uses the default schema."""
    name = f"sealrelay_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_URL).execution_options(isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield name
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        await admin.dispose()


def relay_config(tmp_path: Path, smtp_port: int, database_url: str) -> Path:
    return serve_config(
        tmp_path,
        smtp_port=smtp_port,
        database_url=database_url,
        extra={"database": "connect_retry_max = 0.5"},
    )


async def log_shows(log_path: Path, needle: str, times: int, process: asyncio.subprocess.Process):
    async with asyncio.timeout(30):
        while log_path.read_text().count(needle) < times:
            assert process.returncode is None, log_path.read_text()
            await asyncio.sleep(0.05)


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.login(AGENT, PASSWORD)
        client.sendmail(AGENT, [PROSPECT], raw_message())


@pytest.mark.slow
async def test_serve_waits_for_the_database_and_then_relays(tmp_path: Path) -> None:
    smtp_port = free_port()
    forward = Forwarder(free_port())  # nothing listens there yet
    async with scratch_database() as name:
        database_url = forward.url.rsplit("/", 1)[0] + f"/{name}"
        config = relay_config(tmp_path, smtp_port, database_url)
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                SEALRELAY, "serve", "--config", str(config), stdout=log, stderr=log
            )
            try:
                await log_shows(log_path, "database not reachable", 3, process)
                await forward.start()
                await wait_for_port(smtp_port, process)
                add = await asyncio.create_subprocess_exec(
                    SEALRELAY,
                    *("user", "add", AGENT, "--password-stdin", "--config", str(config)),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                await add.communicate(f"{PASSWORD}\n".encode())
                assert add.returncode == 0
                await asyncio.to_thread(send, smtp_port)
                async with asyncio.timeout(30):
                    while not list((tmp_path / "outbox").glob("*.eml")):
                        await asyncio.sleep(0.05)
            finally:
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    code = await process.wait()
                await forward.stop()
        assert code == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()


async def test_serve_stops_cleanly_while_waiting_for_the_database(tmp_path: Path) -> None:
    nothing_there = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    config = relay_config(tmp_path, free_port(), nothing_there)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            SEALRELAY, "serve", "--config", str(config), stdout=log, stderr=log
        )
        try:
            await log_shows(log_path, "database not reachable", 2, process)
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await process.wait()
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
