"""Relays for webhook tests: chosen roles and clock, the agent and an admin in place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import users
from gateway.mail.dkim import DkimKey
from gateway.mail.outgoing import Signer
from gateway.store.db import Database
from gateway.store.models import Role, utcnow
from sealrelay.serve import Relay
from tests.conftest import (
    AGENT,
    ALIAS,
    DKIM_DOMAIN,
    DKIM_SELECTOR,
    PASSWORD,
    Harness,
    relay_settings,
)
from tests.support import Sink
from tests.webhooks.receiver import Receiver

ADMIN = "it@broker.example"


@dataclass
class FakeClock:
    """The relay's clock, moved by hand."""

    now: datetime = field(default_factory=utcnow)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


StartRelay = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()


@pytest.fixture
async def start_relay(
    database: Database,
    sink: Sink,
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    dkim_key: DkimKey,
    dkim_key_file: Path,
) -> AsyncIterator[StartRelay]:
    """Start relays with a chosen clock and roles; all are stopped at the end."""
    cert, key = tls_files
    await users.add_user(database, AGENT, PASSWORD, aliases=(ALIAS,))
    await users.add_user(database, ADMIN, PASSWORD, role=Role.ADMIN)
    started: list[Relay] = []

    async def start(
        *,
        clock: Callable[[], datetime] = utcnow,
        roles: Collection[str] = ("smtp", "worker"),
        **sections: dict[str, Any],
    ) -> Harness:
        smtp = {"tls_cert": str(cert), "tls_key": str(key), **sections.pop("smtp", {})}
        settings = relay_settings(
            tmp_path,
            sink.port,
            smtp=smtp,
            dkim={DKIM_DOMAIN: {"selector": DKIM_SELECTOR, "key_file": str(dkim_key_file)}},
            **sections,
        )
        relay = Relay(
            settings,
            db=database,
            roles=roles,
            signer=Signer({DKIM_DOMAIN: dkim_key}),
            clock=clock,
        )
        await relay.start()
        started.append(relay)
        return Harness(relay, sink, settings, dkim_key)

    yield start
    for relay in started:
        await relay.stop()
