"""sealrelay as Postfix's after-queue content filter (docs/postfix.md), with a real Postfix.

    client -> Postfix smtpd (content_filter) -> sealrelay's trusted listener
           -> Postfix re-injection smtpd -> relayhost = the recording Sink

Both sides run what docs/postfix.md gives: its main.cf and master.cf blocks for Postfix, its
TOML block (a `[[smtp.trusted]]` entry on its own listener with `map_agents`, the
re-injection port as upstream) on top of the test relay's settings; only the ports differ.
SQLite and PostgreSQL (relay_factory).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway import users
from gateway.mail import headers
from gateway.store.models import Delivery, Event, Letter, LetterStatus, Message
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, dkim_dns
from tests.postfix_instance import PostfixInstance, delay_reasons, postfix_instance
from tests.queue_wait import queue_idle
from tests.support import Sink, free_port

pytestmark = pytest.mark.slow

PROSPECT = "paula@example.com"
STRANGER = "someone@elsewhere.example"
PDF = os.urandom(3 * 1024 * 1024)  # over the default link_attachments_over (2 MiB)
MIDSIZE_PDF = os.urandom(1536 * 1024)
SALES = "sales.agent@broker.example"
LETTER_LINK = re.compile(r"http://127\.0\.0\.1:8080/l/([A-Za-z0-9_-]{43})")


DOCS = Path(__file__).parents[2] / "docs" / "postfix.md"
DOCS_FILTER, DOCS_REINJECTION = 10025, 10026


def documented(heading: str) -> str:
    """The first code block under `heading` in docs/postfix.md: the tests run what it says."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n") :]
    return section.split("```", 2)[1].split("\n", 1)[1]


def config_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class Setup:
    """Ports of the three hops, so each side can be started (or left down) on its own."""

    tmp_path: Path
    sink: Sink
    filter_port: int
    reinject_port: int

    def ports(self, text: str) -> str:
        """The docs' ports 10025 and 10026 replaced with this test's."""
        text = re.sub(rf"\b{DOCS_FILTER}\b", str(self.filter_port), text)
        return re.sub(rf"\b{DOCS_REINJECTION}\b", str(self.reinject_port), text)

    def main_cf(self) -> list[str]:
        """main.cf as the docs give it: everything received goes through sealrelay; Postfix's
        own bounces do not (the bounce test shows it)."""
        return config_lines(self.ports(documented("### Postfix: main.cf")))

    def postfix_lines(self, *, reinjection_up: bool = True) -> list[str]:
        """master.cf as the docs give it; without the re-injection service when it is down."""
        lines = config_lines(self.ports(documented("### Postfix: master.cf")))
        start = next(i for i, line in enumerate(lines) if line.startswith("127.0.0.1:"))
        assert lines[start].startswith(f"127.0.0.1:{self.reinject_port} inet"), lines[start]
        return lines if reinjection_up else lines[:start]

    @asynccontextmanager
    async def postfix(self, *, reinjection_up: bool = True) -> AsyncIterator[PostfixInstance]:
        async with postfix_instance(
            self.tmp_path / "postfix",
            relayhost=f"[127.0.0.1]:{self.sink.port}",
            main_cf=self.main_cf(),
            master_cf=self.postfix_lines(reinjection_up=reinjection_up),
        ) as postfix:
            yield postfix

    async def sealrelay(
        self, relay_factory: StartRelay, upstream: dict[str, Any] | None = None, **sections: Any
    ) -> Harness:
        """sealrelay with the docs' TOML block on top of the test relay's settings."""
        toml = tomllib.loads(self.ports(documented("### sealrelay: sealrelay.toml")))
        relay = await relay_factory(
            # the limits docs' main.cf matches: sealrelay's defaults
            smtp={**toml["smtp"], "max_message_size": 52428800, "max_recipients": 100},
            upstream={**toml["upstream"], **(upstream or {})},
            **sections,
        )
        return relay


@pytest.fixture
def setup(tmp_path: Path, sink: Sink) -> Setup:
    return Setup(tmp_path, sink, free_port(), free_port())


def mail(sender: str = AGENT, subject: str = "Ihr Exposé", pdf: bytes | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{sender}>"
    message["To"] = PROSPECT
    message["Subject"] = subject
    message["Message-ID"] = f"<{os.urandom(6).hex()}@broker.example>"
    message.set_content("Guten Tag,\n\nhier ist das Exposé.\n")
    if pdf is not None:
        message.add_attachment(pdf, maintype="application", subtype="pdf", filename="Expose.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


async def submit(postfix: PostfixInstance, data: bytes, sender: str = AGENT) -> None:
    """As an agent's program (or an application) hands mail to Postfix: plain SMTP from
    mynetworks."""
    await aiosmtplib.send(
        data,
        sender=sender,
        recipients=[PROSPECT],
        hostname="127.0.0.1",
        port=postfix.smtpd_port,
        timeout=30,
    )


async def settled(relay: Harness, postfix: PostfixInstance) -> None:
    """Both queues are empty: whatever was going to reach the sink has reached it."""
    await postfix.wait_queue_empty()
    await queue_idle(relay.relay.db)
    await postfix.wait_queue_empty()


def received_lines(data: bytes) -> list[str]:
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for k, v in parsed.items() if k.lower() == "received"]


def text_of(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def counts(relay: Harness) -> tuple[int, int]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    return messages or 0, deliveries or 0


async def test_plain_mail_passes_once_signed_and_marked(
    setup: Setup, relay_factory: StartRelay
) -> None:
    relay = await setup.sealrelay(relay_factory)
    async with setup.postfix() as postfix:
        original = mail()
        await submit(postfix, original)
        [copy] = await setup.sink.expect(1)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 1
    assert copy.mail_from == AGENT and copy.rcpt_tos == [PROSPECT]
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))
    received = received_lines(copy.data)
    # newest first: the re-injection smtpd, sealrelay, the first smtpd
    assert "by postfix.test.example (Postfix) with ESMTP id" in received[0], received
    assert (
        "(trusted client Postfix, entry postfix) by relay.broker.example (sealrelay)"
        in (received[1])
    ), received
    assert "by postfix.test.example (Postfix) with ESMTP id" in received[2], received
    assert len(received) == 3
    fields = headers.fields_of(copy.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == "Ihr Exposé"
    agent = await users.agent_by_address(relay.relay.db, AGENT)
    async with relay.relay.db.transaction() as session:
        [row] = (await session.scalars(select(Message))).all()
    assert agent is not None and row.user_id == agent.user_id  # map_agents: the agent's policy


async def test_the_copies_go_back_to_postfix_as_bdat_chunks(
    setup: Setup, relay_factory: StartRelay
) -> None:
    """The re-injection smtpd offers CHUNKING (Postfix 3.4 and later): sealrelay hands each
    copy back as one BDAT chunk, a big one streamed from the blob store, and Postfix passes
    them on whole and verifiable. A connection per copy, so that Postfix logs each one's
    commands when it ends."""
    relay = await setup.sealrelay(relay_factory, upstream={"connection_cache": 0})
    async with setup.postfix() as postfix:
        await submit(postfix, mail(subject="klein"))
        await submit(postfix, mail(subject="groß", pdf=MIDSIZE_PDF))
        copies = await setup.sink.expect(2)
        await settled(relay, postfix)
        said = re.compile(r"disconnect from \S+ .*\bbdat=1 .*commands=\d+")
        async with asyncio.timeout(30):
            while len(said.findall(postfix.log())) < 2:
                await asyncio.sleep(0.1)
    for copy in copies:
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))
    big = max(copies, key=lambda copy: len(copy.data))
    assert len(big.data) > len(MIDSIZE_PDF) and b"Expose.pdf" in big.data


async def test_large_attachment_arrives_as_a_download_link_by_the_agents_group(
    setup: Setup, relay_factory: StartRelay
) -> None:
    """1.5 MiB: under the default link_attachments_over (2 MiB), over the sales group's 1 MiB.
    map_agents gives the sales agent's mail the group's policy, through Postfix."""
    relay = await setup.sealrelay(
        relay_factory, groups=[{"name": "sales", "link_attachments_over": "1MiB"}]
    )
    await users.add_user(relay.relay.db, SALES, PASSWORD, group="sales")
    async with setup.postfix() as postfix:
        await submit(postfix, mail(sender=SALES, pdf=MIDSIZE_PDF), sender=SALES)
        await submit(postfix, mail(pdf=MIDSIZE_PDF))
        copies = await setup.sink.expect(2)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 2
    by_sender = {copy.mail_from: copy.data for copy in copies}
    linked, attached = by_sender[SALES], by_sender[AGENT]
    assert MIDSIZE_PDF[:64] not in linked and b"Expose.pdf" in linked
    assert "http://127.0.0.1:8080/d/" in text_of(linked)
    assert len(linked) < 200_000
    assert dkimpy.verify(linked, dnsfunc=dkim_dns(relay.dkim_key))
    assert len(attached) > len(MIDSIZE_PDF) and "/d/" not in text_of(attached)
    assert dkimpy.verify(attached, dnsfunc=dkim_dns(relay.dkim_key))


async def test_registered_letter_is_held_and_only_the_letter_leaves(
    setup: Setup, relay_factory: StartRelay
) -> None:
    relay = await setup.sealrelay(relay_factory)
    async with setup.postfix() as postfix:
        await submit(postfix, mail(subject="[Exposé] Villa am See", pdf=PDF))
        [letter] = await setup.sink.expect(1)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 1
    assert letter.rcpt_tos == [PROSPECT]
    fields = headers.fields_of(letter.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        "Ihr angefordertes Exposé: Villa am See"
    )
    assert LETTER_LINK.search(text_of(letter.data))
    assert PDF[:64] not in letter.data and b"hier ist das Expos" not in letter.data
    async with relay.relay.db.transaction() as session:
        [held] = (await session.scalars(select(Letter))).all()
    assert held.recipient == PROSPECT and held.status == LetterStatus.HELD


async def test_reinjection_port_down_sealrelay_defers_then_delivers_once(
    setup: Setup, relay_factory: StartRelay
) -> None:
    relay = await setup.sealrelay(relay_factory)
    async with setup.postfix(reinjection_up=False) as postfix:
        await submit(postfix, mail())
        await postfix.wait_queue_empty()  # Postfix handed it to sealrelay: 250, its job done
        async with asyncio.timeout(30):
            while True:
                async with relay.relay.db.transaction() as session:
                    [row] = (await session.scalars(select(Delivery))).all()
                if row.attempts >= 2:
                    break
                await asyncio.sleep(0.1)
        assert row.status == "queued" and row.last_error, row.last_error
        assert setup.sink.messages == []
        async with relay.relay.db.transaction() as session:
            deferred = (
                await session.scalars(select(Event).where(Event.type == "delivery.deferred"))
            ).all()
        assert deferred and all(str(setup.reinject_port) in e.data["error"] for e in deferred)
        await postfix.reconfigure(master_cf=setup.postfix_lines(reinjection_up=True))
        [copy] = await setup.sink.expect(1)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 1
    assert copy.mail_from == AGENT and copy.rcpt_tos == [PROSPECT]
    assert await counts(relay) == (1, 1)


async def test_sealrelay_down_postfix_keeps_the_mail_and_delivers_when_it_is_back(
    setup: Setup, relay_factory: StartRelay
) -> None:
    async with setup.postfix() as postfix:
        await submit(postfix, mail())
        [queued] = await postfix.wait_deferred()
        [reason] = delay_reasons(queued)
        assert f"127.0.0.1[127.0.0.1]:{setup.filter_port}: Connection refused" in reason
        relay = await setup.sealrelay(relay_factory)
        await postfix.flush()
        [copy] = await setup.sink.expect(1)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 1
    assert copy.mail_from == AGENT
    assert any("(sealrelay)" in line for line in received_lines(copy.data))
    assert await counts(relay) == (1, 1)


async def test_mail_from_a_domain_we_do_not_serve_is_refused_and_postfix_bounces_it(
    setup: Setup, relay_factory: StartRelay
) -> None:
    relay = await setup.sealrelay(relay_factory)
    async with setup.postfix() as postfix:
        await submit(postfix, mail(sender=STRANGER), sender=STRANGER)
        [bounce] = await setup.sink.expect(1)
        await settled(relay, postfix)
    assert len(setup.sink.messages) == 1
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == [STRANGER]
    text = bounce.data.decode("utf-8", errors="replace")
    assert "Undelivered Mail Returned to Sender" in text
    assert "550 5.7.1 This client may send only for the domains this relay serves" in (
        " ".join(text.split())
    )
    assert await counts(relay) == (0, 0)  # nothing stored, nothing sent on
