"""The milter front against a whole relay, speaking the MTA's side packet by packet.

What passes (header added, journaled, nothing queued), what is taken over (committed, then
discard, delivered once by the relay), what is refused (the SMTP front's code and text), and
that nothing is kept when the MTA goes away mid-message or something inside fails.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from gateway.access import MessageScope
from gateway.console.timeline import Timeline
from gateway.fronts.smtp import Reply
from gateway.store.models import Delivery, Event, Message
from tests.conftest import AGENT, Harness, StartRelay
from tests.fronts.milter_client import MilterClient
from tests.mail import tnef_stream
from tests.queue_wait import queue_idle
from tests.support import free_port

PROSPECT = "prospect@example.com"
OTHER = "buyer@example.org"
MiB = 1024 * 1024


def message(
    author: str = AGENT, *, attachment: int = 0, extra: dict[str, str] | None = None
) -> bytes:
    mail = EmailMessage()
    mail["From"] = author
    mail["To"] = f"{PROSPECT}, {OTHER}"
    mail["Subject"] = "Ihr Exposé zur Wohnung in der Musterstraße, mit allen Unterlagen dazu"
    for name, value in (extra or {}).items():
        mail[name] = value
    mail.set_content("Guten Tag!\n")
    if attachment:
        mail.add_attachment(
            b"%PDF-1.4 " + bytes(attachment),
            maintype="application",
            subtype="pdf",
            filename="plan.pdf",
        )
    return mail.as_bytes(policy=email.policy.SMTP)


async def start(relay_factory: StartRelay, **milter: Any) -> tuple[Harness, MilterClient]:
    relay = await relay_factory(
        milter={"listen": f"127.0.0.1:{free_port()}", **milter},
        smtp={"max_message_size": 8 * MiB},
    )
    client = await MilterClient.open(relay.relay.milter.port)
    await client.start()
    return relay, client


async def stored(relay: Harness) -> tuple[int, int, list[dict[str, Any]]]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
        records = (
            await session.scalars(select(Event.data).where(Event.type == "message.milter"))
        ).all()
    return messages or 0, deliveries or 0, list(records)


async def test_mail_every_recipient_gets_as_is_passes_with_our_header(
    relay_factory: StartRelay,
) -> None:
    relay, client = await start(relay_factory)
    assert [a.code for a in await client.envelope(AGENT, [PROSPECT, OTHER])] == [b"c"]
    answers = await client.content(message(), queue_id="4QABC")
    assert [a.code for a in answers] == [b"h", b"c"]
    name, value = answers[0].data.rstrip(b"\0").split(b"\0")
    messages, deliveries, records = await stored(relay)
    assert (messages, deliveries) == (1, 0)
    assert records == [{"outcome": "passed", "mta_queue_id": "4QABC", "login": None}]
    async with relay.relay.db.transaction() as session:
        row = await session.scalar(select(Message))
    assert row is not None and row.peer == "192.0.2.7" and row.helo == "client.example"
    assert (name, value.decode()) == (
        b"X-Sealrelay",
        f" {row.id} checked by relay.broker.example; passed",
    )
    assert await relay.relay.blobs.read(row.blob) == message()
    story = await Timeline(relay.relay.db).message(MessageScope(everything=True), row.id)
    assert story is not None
    assert {"message.received", "message.milter"} <= {e.type for e in story.events}
    page = await Timeline(relay.relay.db).messages(MessageScope(everything=True))
    assert [m.id for m in page.items] == [row.id]
    await client.close()
    await queue_idle(relay.relay.db)
    assert relay.sink.messages == []


async def test_the_agents_instructions_to_the_relay_are_taken_off(
    relay_factory: StartRelay,
) -> None:
    _, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT])
    raw = message(extra={"X-Sealrelay-Language": "en"})
    answers = await client.content(raw)
    assert [(a.code, a.data) for a in answers[:1]] == [
        (b"m", b"\0\0\0\x01X-Sealrelay-Language\0\0")
    ]
    assert [a.code for a in answers[1:]] == [b"h", b"c"]
    await client.close()


async def test_a_loop_mark_that_is_not_ours_is_taken_off_mail_postfix_delivers(
    relay_factory: StartRelay,
) -> None:
    relay, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT])
    forged = "v=1; h=relay.broker.example; t=1; id=x; mac=AAAA"
    answers = await client.content(message(extra={"X-Sealrelay-Loop": forged}))
    assert [(a.code, a.data) for a in answers[:1]] == [(b"m", b"\0\0\0\x01X-Sealrelay-Loop\0\0")]
    assert [a.code for a in answers[1:]] == [b"h", b"c"]
    await client.close()
    async with relay.relay.db.transaction() as session:
        kinds = (await session.scalars(select(Event.type))).all()
    assert "message.loop_mark_forged" in kinds


async def test_mail_that_needs_a_link_is_taken_over_and_delivered_once(
    relay_factory: StartRelay,
) -> None:
    relay, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT, OTHER], login=AGENT)
    answers = await client.content(message(attachment=3 * MiB), queue_id="4QBIG")
    assert [a.code for a in answers] == [b"d"]
    messages, deliveries, records = await stored(relay)
    assert (messages, deliveries) == (1, 2)
    assert records == [{"outcome": "taken_over", "mta_queue_id": "4QBIG", "login": AGENT}]
    copies = await relay.sink.expect(2)
    await queue_idle(relay.relay.db)
    assert sorted(r for copy in relay.sink.messages for r in copy.rcpt_tos) == [OTHER, PROSPECT]
    for copy in copies:
        assert len(copy.data) < MiB  # the attachment became a link
        text = email.message_from_bytes(copy.data, policy=email.policy.default)
        bodies = [p.get_content() for p in text.walk() if p.get_content_maintype() == "text"]
        assert any("http://127.0.0.1:8080/d/" in body for body in bodies)
        assert copy.mail_from == AGENT and b"DKIM-Signature" in copy.data
    await client.close()


async def test_an_outlook_winmail_dat_for_prospects_is_taken_over_as_its_files(
    relay_factory: StartRelay,
) -> None:
    """Postfix would deliver the winmail.dat a prospect cannot open: the relay takes the mail
    over and sends the file inside instead."""
    relay, client = await start(relay_factory)
    pdf = b"%PDF-1.4 offer"
    raw = tnef_stream.outlook_mail(
        tnef_stream.stream([tnef_stream.Attachment(pdf, title="Angebot.pdf")]),
        sender=AGENT,
        to=PROSPECT,
        subject="Angebot",
        text="Guten Tag!\n",
    )
    await client.envelope(AGENT, [PROSPECT], login=AGENT)
    answers = await client.content(raw, queue_id="4QTNEF")
    assert [a.code for a in answers] == [b"d"]
    *_, records = await stored(relay)
    assert records == [{"outcome": "taken_over", "mta_queue_id": "4QTNEF", "login": AGENT}]
    [copy] = await relay.sink.expect(1)
    parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
    files = {p.get_filename(): p.get_content() for p in parsed.iter_attachments()}
    assert files == {"Angebot.pdf": pdf}
    await client.close()


async def test_a_utf8_recipient_the_mta_took_with_smtputf8_goes_out_with_it(
    relay_factory: StartRelay,
) -> None:
    """Postfix hands on MAIL's SMTPUTF8 (RFC 6531): the trace says UTF8SMTPA, and the copies
    the relay takes over go to an upstream that offers SMTPUTF8 with the address as written."""
    relay, client = await start(relay_factory)
    relay.sink.smtputf8 = True
    utf8_prospect = "jörg@bücher.example"
    answers = await client.envelope(
        AGENT, [utf8_prospect, OTHER], login=AGENT, mail_args=("SMTPUTF8", "SIZE=4000000")
    )
    assert [a.code for a in answers] == [b"c"]
    answers = await client.content(message(attachment=3 * MiB), queue_id="4QUTF")
    assert [a.code for a in answers] == [b"d"]
    copies = await relay.sink.expect(2)
    await queue_idle(relay.relay.db)
    assert sorted(r for copy in copies for r in copy.rcpt_tos) == [OTHER, utf8_prospect]
    assert [copy.smtputf8 for copy in copies if utf8_prospect in copy.rcpt_tos] == [True]
    for copy in copies:
        assert b" with UTF8SMTPA id " in b" ".join(copy.data.split())
    await client.close()


@pytest.mark.parametrize(
    ("sender", "login", "reply"),
    [
        (
            "someone@elsewhere.example",
            None,
            Reply.not_our_domain("someone@elsewhere.example", "MAIL FROM"),
        ),
        ("other@broker.example", AGENT, Reply.not_your_address("other@broker.example")),
    ],
    ids=["not-our-domain", "not-the-logins-address"],
)
async def test_a_sender_the_policy_refuses_hears_the_smtp_fronts_reply(
    relay_factory: StartRelay, sender: str, login: str | None, reply: str
) -> None:
    relay, client = await start(relay_factory)
    answers = await client.envelope(sender, [PROSPECT], login=login)
    assert [(a.code, a.text) for a in answers] == [(b"y", reply)]
    assert (await stored(relay))[:2] == (0, 0)
    await client.close()


async def test_a_foreign_from_header_is_refused_at_the_end(relay_factory: StartRelay) -> None:
    relay, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT])
    answers = await client.content(message("boss@elsewhere.example"))
    reply = Reply.not_our_domain("boss@elsewhere.example", "From header")
    assert [(a.code, a.text) for a in answers] == [(b"y", reply)]
    assert (await stored(relay))[:2] == (0, 0)
    await client.close()


@pytest.mark.parametrize("login", [None, AGENT])
async def test_null_sender_mail_is_judged_by_its_from_header(
    relay_factory: StartRelay, login: str | None
) -> None:
    """Postfix hands on an auto-reply or a read receipt with MAIL FROM:<>, from a logged-in
    agent or not: it passes when its From header may send, and is refused when not."""
    relay, client = await start(relay_factory)
    assert [a.code for a in await client.envelope("", [PROSPECT], login=login)] == [b"c"]
    assert [a.code for a in await client.content(message())] == [b"h", b"c"]
    await client.envelope("", [PROSPECT], login=login)
    answers = await client.content(message("boss@elsewhere.example"))
    assert [a.code for a in answers] == [b"y"] and " 5.7.1 " in answers[0].text
    async with relay.relay.db.transaction() as session:
        senders = (await session.scalars(select(Message.sender))).all()
    assert senders == [""]
    await client.close()


async def test_too_many_recipients_and_too_big_are_refused(relay_factory: StartRelay) -> None:
    relay, client = await start(relay_factory)
    recipients = [f"p{n}@example.com" for n in range(6)]
    answers = await client.envelope(AGENT, recipients)
    assert [(a.code, a.text) for a in answers] == [
        (b"y", Reply.TOO_MANY_RECIPIENTS.format(limit=5))
    ]
    await client.envelope(AGENT, [PROSPECT])
    answers = await client.content(message(attachment=9 * MiB))
    assert [(a.code, a.text) for a in answers] == [(b"y", Reply.TOO_BIG.format(limit=8 * MiB))]
    assert (await stored(relay))[:2] == (0, 0)
    await client.close()


async def test_an_mta_that_goes_away_mid_message_leaves_nothing(
    relay_factory: StartRelay,
) -> None:
    relay, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT])
    raw = message(attachment=3 * MiB)
    body = raw.partition(b"\r\n\r\n")[2]
    await client.ask(b"L", b"From\0 " + AGENT.encode() + b"\0")
    await client.ask(b"N")
    await client.ask(b"B", body[:60000])
    await client.close()
    assert (await stored(relay))[:2] == (0, 0)
    # the front is still there for the next connection
    again = await MilterClient.open(relay.relay.milter.port)
    await again.start()
    await again.envelope(AGENT, [PROSPECT])
    assert [a.code for a in await again.content(message())] == [b"h", b"c"]
    await again.close()


async def test_a_failure_inside_is_a_tempfail_and_nothing_is_kept(
    relay_factory: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, client = await start(relay_factory)

    async def broken(*args: Any) -> str:
        raise OperationalError("COMMIT", {}, Exception("the database went away"))

    monkeypatch.setattr(relay.relay.pipeline, "commit", broken)
    await client.envelope(AGENT, [PROSPECT])
    answers = await client.content(message(attachment=3 * MiB))
    assert [(a.code, a.text) for a in answers] == [(b"y", Reply.TEMPORARY)]
    assert (await stored(relay))[:2] == (0, 0)
    await client.close()


async def test_only_the_allowed_networks_may_connect(relay_factory: StartRelay) -> None:
    relay = await relay_factory(
        milter={"listen": f"127.0.0.1:{free_port()}", "allow_from": ["192.0.2.0/24"]}
    )
    client = await MilterClient.open(relay.relay.milter.port)
    assert await client.closed_by_peer()


async def test_stopping_closes_idle_connections_at_once(relay_factory: StartRelay) -> None:
    relay, client = await start(relay_factory)
    await client.envelope(AGENT, [PROSPECT])
    async with asyncio.timeout(5):  # far below the 30 s a message being decided would get
        await relay.relay.milter.stop()
    assert await client.closed_by_peer()
    assert (await stored(relay))[:2] == (0, 0)
