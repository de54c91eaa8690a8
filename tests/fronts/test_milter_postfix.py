"""The milter front behind a real Postfix (tests/postfix_instance.py), as docs/postfix.md sets
it up: a client sends to Postfix, Postfix asks sealrelay's milter listener, and delivers to its
relayhost (a recording sink of its own); mail sealrelay takes over goes to sealrelay's
upstream (another sink). Each case checks both sinks, Postfix's queue and the relay's store.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import func, select

from gateway.fronts.smtp import Reply
from gateway.store.models import Delivery, Event, Message
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay
from tests.postfix_instance import PostfixInstance, postfix_instance
from tests.queue_wait import queue_idle
from tests.support import Sink, free_port

pytestmark = pytest.mark.slow

PROSPECT = "prospect@example.com"
OTHER = "buyer@example.org"
MiB = 1024 * 1024


def mail(author: str = AGENT, *, attachment: int = 0, subject: str = "Ihr Exposé") -> EmailMessage:
    message = EmailMessage()
    message["From"] = author
    message["To"] = f"{PROSPECT}, {OTHER}"
    message["Subject"] = subject
    message.set_content("Guten Tag!\n")
    if attachment:
        message.add_attachment(
            b"%PDF-1.4 " + bytes(attachment),
            maintype="application",
            subtype="pdf",
            filename="plan.pdf",
        )
    return message


@pytest.fixture
async def postfix_sink() -> AsyncIterator[Sink]:
    """Postfix's relayhost: what Postfix itself delivered."""
    sink = await Sink().start()
    yield sink
    await sink.stop()


@pytest.fixture
async def setup(
    relay_factory: StartRelay, postfix_sink: Sink, tmp_path: Path
) -> AsyncIterator[tuple[Harness, PostfixInstance]]:
    milter_port = free_port()
    relay = await relay_factory(
        milter={"listen": f"127.0.0.1:{milter_port}"},
        smtp={"max_message_size": 8 * MiB},
    )
    async with postfix_instance(
        tmp_path / "postfix",
        relayhost=f"[127.0.0.1]:{postfix_sink.port}",
        main_cf=[
            f"smtpd_milters = inet:127.0.0.1:{milter_port}",
            "milter_default_action = tempfail",
            "milter_protocol = 6",
        ],
        logins={AGENT: PASSWORD},
    ) as postfix:
        yield relay, postfix


async def send(
    postfix: PostfixInstance, message: EmailMessage, sender: str = AGENT, *, login: bool = False
) -> str:
    _, reply = await aiosmtplib.send(
        message,
        sender=sender,
        recipients=[PROSPECT, OTHER],
        hostname="127.0.0.1",
        port=postfix.smtpd_port,
        timeout=60,
        username=AGENT if login else None,
        password=PASSWORD if login else None,
        start_tls=False,
    )
    return reply


async def stored(relay: Harness) -> tuple[int, int]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    return messages or 0, deliveries or 0


async def test_plain_mail_passes_through_postfix_with_our_header(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    await send(postfix, mail())
    (delivered,) = await postfix_sink.expect(1)
    await postfix.wait_queue_empty()
    assert sorted(delivered.rcpt_tos) == [OTHER, PROSPECT]
    parsed = email.message_from_bytes(delivered.data, policy=email.policy.default)
    async with relay.relay.db.transaction() as session:
        row = await session.scalar(select(Message))
        record = await session.scalar(select(Event.data).where(Event.type == "message.milter"))
    assert row is not None and record is not None
    assert parsed["X-Sealrelay"] == f"{row.id} checked by relay.broker.example; passed"
    assert record["outcome"] == "passed"
    assert record["mta_queue_id"] and f"{record['mta_queue_id']}: " in postfix.log()
    assert await stored(relay) == (1, 0)
    await queue_idle(relay.relay.db)
    assert relay.sink.messages == []


async def test_mail_with_a_large_attachment_is_delivered_by_sealrelay_exactly_once(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    await send(postfix, mail(attachment=3 * MiB))
    copies = await relay.sink.expect(2)
    await queue_idle(relay.relay.db)
    await postfix.wait_queue_empty()
    assert "milter-discard" in postfix.log()
    assert sorted(r for copy in relay.sink.messages for r in copy.rcpt_tos) == [OTHER, PROSPECT]
    for copy in copies:
        assert len(copy.data) < MiB
        parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
        bodies = [p.get_content() for p in parsed.walk() if p.get_content_maintype() == "text"]
        assert any("http://127.0.0.1:8080/d/" in body for body in bodies)
        # Postfix passes no Received line of its own to milters; the relay's names the
        # client Postfix saw, and the Postfix service that handed the message over
        (trace,) = parsed.get_all("Received") or []
        assert trace.startswith(
            "from localhost (127.0.0.1) (trusted client postfix, entry milter)"
            " by relay.broker.example (sealrelay) with ESMTP id "
        )
    assert postfix_sink.messages == []
    assert await stored(relay) == (1, 2)


async def test_a_policy_refusal_reaches_the_client(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as at_mail:
        await send(postfix, mail("someone@elsewhere.example"), sender="someone@elsewhere.example")
    assert at_mail.value.code == 550
    assert (
        at_mail.value.message == Reply.not_our_domain("someone@elsewhere.example", "MAIL FROM")[4:]
    )
    with pytest.raises(aiosmtplib.SMTPDataError) as at_data:
        await send(postfix, mail("boss@elsewhere.example"))
    assert at_data.value.code == 550
    assert (
        at_data.value.message == Reply.not_our_domain("boss@elsewhere.example", "From header")[4:]
    )
    assert await postfix.queue() == []
    assert await stored(relay) == (0, 0)
    assert postfix_sink.messages == [] and relay.sink.messages == []


async def test_with_the_milter_down_postfix_tempfails_and_nothing_is_lost(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    await relay.relay.milter.stop()
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send(postfix, mail(subject="first try"))
    assert (refused.value.code, refused.value.message) == (
        451,
        "4.7.1 Service unavailable - try again later",
    )
    assert await postfix.queue() == []
    assert await stored(relay) == (0, 0)
    await relay.relay.milter.start()
    await send(postfix, mail(subject="first try"))  # the client's retry
    (delivered,) = await postfix_sink.expect(1)
    await postfix.wait_queue_empty()
    assert b"\r\nSubject: first try\r\n" in delivered.data
    assert b"\r\nX-Sealrelay: " in delivered.data
    assert await stored(relay) == (1, 0)


async def test_a_client_that_hangs_up_mid_message_leaves_nothing(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=postfix.smtpd_port, timeout=30)
    await client.connect()
    await client.mail(AGENT)
    await client.rcpt(PROSPECT)
    code, _ = await client.execute_command(b"DATA")
    assert code == 354
    assert client.transport is not None
    client.transport.write(mail(attachment=3 * MiB).as_bytes()[: 2 * MiB])
    client.close()
    async with asyncio.timeout(30):  # Postfix notices, tells the milter to abort
        while "lost connection after DATA" not in postfix.log():
            await asyncio.sleep(0.1)
    assert await postfix.queue() == []
    assert await stored(relay) == (0, 0)
    await send(postfix, mail(subject="next"))  # the listener is there for the next message
    await postfix_sink.expect(1)
    assert relay.sink.messages == []


async def test_a_postfix_login_that_is_an_agent_sends_as_that_agent(
    setup: tuple[Harness, PostfixInstance], postfix_sink: Sink
) -> None:
    relay, postfix = setup
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(postfix, mail("sales@broker.example"), "sales@broker.example", login=True)
    assert (refused.value.code, refused.value.message) == (
        553,
        Reply.not_your_address("sales@broker.example")[4:],
    )
    assert await stored(relay) == (0, 0)
    await send(postfix, mail(), login=True)
    await postfix_sink.expect(1)
    await postfix.wait_queue_empty()
    async with relay.relay.db.transaction() as session:
        row = await session.scalar(select(Message))
        record = await session.scalar(select(Event.data).where(Event.type == "message.milter"))
    assert row is not None and row.user_id is not None and row.protocol == "ESMTPA"
    assert row.trusted_client is None
    assert record is not None and record["login"] == AGENT


async def test_taken_over_mail_can_go_back_through_postfix_without_the_milter(
    relay_factory: StartRelay, postfix_sink: Sink, tmp_path: Path
) -> None:
    """docs/postfix.md's loop: sealrelay's upstream is a Postfix listener without milters."""
    milter_port, return_port = free_port(), free_port()
    relay = await relay_factory(
        milter={"listen": f"127.0.0.1:{milter_port}"},
        smtp={"max_message_size": 8 * MiB},
        upstream={"url": f"smtp://127.0.0.1:{return_port}"},
    )
    async with postfix_instance(
        tmp_path / "postfix",
        relayhost=f"[127.0.0.1]:{postfix_sink.port}",
        main_cf=[
            f"smtpd_milters = inet:127.0.0.1:{milter_port}",
            "milter_default_action = tempfail",
            "milter_protocol = 6",
        ],
        master_cf=[
            f"127.0.0.1:{return_port} inet n - n - - smtpd",
            "  -o smtpd_milters=",
            "  -o mynetworks=127.0.0.0/8",
            "  -o smtpd_client_restrictions=permit_mynetworks,reject",
        ],
    ) as postfix:
        await send(postfix, mail(attachment=3 * MiB))
        await queue_idle(relay.relay.db)
        copies = await postfix_sink.expect(2)
        await postfix.wait_queue_empty()
    assert sorted(r for copy in copies for r in copy.rcpt_tos) == [OTHER, PROSPECT]
    for copy in copies:
        assert len(copy.data) < MiB and b"\r\nX-Sealrelay: " not in copy.data
        parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
        trace = [" ".join(str(line).split()) for line in parsed.get_all("Received") or []]
        assert trace[0].startswith("from relay.broker.example (localhost [127.0.0.1]) by postfix")
        assert "by relay.broker.example (sealrelay)" in trace[1]
    assert await stored(relay) == (1, 2)
    assert relay.sink.messages == []
