"""Postfix's smtp-source (the load generator bench/compare.py uses) against a trusted listener.

A load generator cannot log in; through a `[[smtp.trusted]]` entry for its address it sends
like any trusted host, and every message it sends arrives upstream exactly once.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from gateway.store.models import Delivery, Message
from tests.conftest import AGENT, StartRelay
from tests.postfix_instance import postfix_command
from tests.queue_wait import queue_idle
from tests.support import free_port, run_process

pytestmark = pytest.mark.slow

SESSIONS = 4
MESSAGES = 20
RECIPIENT = "x@elsewhere.example"


async def smtp_source(*args: str) -> tuple[int, str]:
    return await run_process(postfix_command("smtp-source"), *args, timeout=120)


async def test_smtp_source_without_auth_through_a_trusted_network(
    relay_factory: StartRelay,
) -> None:
    port = free_port()
    relay = await relay_factory(
        smtp={
            "trusted": [
                {
                    "name": "loadgen",
                    "service": "smtp-source",
                    "networks": ["127.0.0.1/32"],
                    "listen": [f"127.0.0.1:{port}"],
                }
            ]
        }
    )
    status, out = await smtp_source(
        "-s", str(SESSIONS), "-m", str(MESSAGES), "-f", AGENT, "-t", RECIPIENT,
        f"127.0.0.1:{port}",
    )  # fmt: skip
    assert status == 0, out
    copies = await relay.sink.expect(MESSAGES, timeout=60)
    await queue_idle(relay.relay.db)
    assert len(relay.sink.messages) == MESSAGES
    assert {(c.mail_from, tuple(c.rcpt_tos)) for c in copies} == {(AGENT, (RECIPIENT,))}
    assert all(b"(trusted client smtp-source, entry loadgen)" in c.data for c in copies)
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    assert (messages, deliveries) == (MESSAGES, MESSAGES)


async def test_smtp_source_from_a_domain_we_do_not_serve_is_refused(
    relay_factory: StartRelay,
) -> None:
    port = free_port()
    relay = await relay_factory(
        smtp={
            "trusted": [
                {"name": "loadgen", "networks": ["127.0.0.1/32"], "listen": [f"127.0.0.1:{port}"]}
            ]
        }
    )
    status, out = await smtp_source(
        "-s", "2", "-m", "4", "-f", "load@elsewhere.example", "-t", RECIPIENT, f"127.0.0.1:{port}"
    )  # fmt: skip
    assert status != 0
    assert "550 5.7.1 This client may send only for the domains this relay serves" in out, out
    await queue_idle(relay.relay.db)
    async with relay.relay.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 0
    assert relay.sink.messages == []
