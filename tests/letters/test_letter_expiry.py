"""The agent hears of a letter that ran out without consent; the archive gets the letter.

A running relay (SMTP, worker, web) with a clock the test moves on; the expiry is found by
the relay's own hourly sweep. SQLite and PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy

import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway.mail import headers
from gateway.store.models import Delivery, Event, LetterStatus, Message
from tests.conftest import AGENT, dkim_dns
from tests.letter_fixtures import StartSite
from tests.letter_site import (
    PROSPECT,
    Clock,
    LetterSite,
    offer,
    token_in,
)
from tests.support import Sink, chained

ARCHIVE = "archiv@broker.example"


async def to_agent(site: LetterSite) -> int:
    return await site.count(Delivery, Delivery.recipient == AGENT)


async def test_the_agent_is_told_once_when_a_letter_expires_unconsented(
    site: LetterSite, clock: Clock
) -> None:
    await site.send_offer()
    clock.advance(days=13)
    await site.relay.sweep_once()
    assert await site.events("letter.expired") == []
    assert len(await site.events("letter.expiry_warned")) == 1  # [notices] expiry_warning

    clock.advance(days=1, seconds=1)
    report = await site.relay.sweep_once()
    assert report.letters_expired == 1
    again = await site.relay.sweep_once()
    assert again.letters_expired == 0
    assert await to_agent(site) == 2  # the warning two days before, then this notice

    arrived = await site.sink.expect(3)
    [notice] = [
        m
        for m in arrived
        if m.rcpt_tos == [AGENT]
        and "Ohne Zustimmung"
        in headers.decoded(headers.first_value(headers.fields_of(m.data), "subject") or "")
    ]
    assert notice.mail_from in ("", "<>")  # the null sender: it never bounces back to us
    fields = headers.fields_of(notice.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        f"Ohne Zustimmung abgelaufen: Villa am See – {PROSPECT}"
    )
    assert headers.first_value(fields, "auto-submitted") == "auto-generated"
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert not parsed.defects
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"{PROSPECT} hat dem Angebot „Villa am See“ nicht zugestimmt" in text
    assert "Das Exposé wurde daher nicht freigegeben." in text
    assert "MEZ" in text and "UTC" in text  # [branding] timezone, named
    assert headers.first_value(fields, "from") == "sealrelay <postmaster@broker.example>"
    assert dkimpy.verify(notice.data, dnsfunc=dkim_dns(site.harness.dkim_key))

    letter = await site.letter_row()
    assert letter.status == LetterStatus.EXPIRED
    assert (
        f"{site.url}/console/messages/{letter.message_id}" in text.splitlines()
    )  # one-step resend
    [event] = await site.events("letter.expired")
    assert event.message_id == letter.message_id
    assert event.data["letter_id"] == letter.id and event.data["recipient"] == PROSPECT
    assert (await chained(site.relay.db)).ok
    async with site.relay.db.transaction() as session:
        notice_row = await session.get(Message, event.data["notice_message_id"])
    assert notice_row is not None and notice_row.kind == "confirmation"

    # the page still says "expired" and offers to ask the agent for a new link
    [sent] = [m for m in site.sink.messages if m.rcpt_tos == [PROSPECT]]
    response, _ = await site.get(f"/l/{token_in(sent.data, site.url)}")
    assert response.status == 410


async def test_a_consented_letter_never_expires(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    clock.advance(days=30)
    report = await site.relay.sweep_once()
    assert report.letters_expired == 0
    assert await site.events("letter.expired") == []
    assert (await site.letter_row()).status == LetterStatus.RELEASED


async def test_the_notice_can_be_turned_off_and_the_event_stays(
    site_factory: StartSite,
    clock: Clock,
) -> None:
    site = await site_factory(
        letter={"expired_notice": False},
    )
    await site.send_offer()
    clock.advance(days=15)
    assert (await site.relay.sweep_once()).letters_expired == 1
    [event] = await site.events("letter.expired")
    assert event.data["notice_message_id"] is None
    assert await to_agent(site) == 0


async def test_the_archive_gets_the_letter_as_sent(
    site_factory: StartSite,
    sink: Sink,
) -> None:
    site = await site_factory(
        letter={"archive_bcc": ARCHIVE},
    )
    await site.harness.send(offer(), recipients=[PROSPECT])
    arrived = await site.sink.expect(1)
    letters = [m for m in arrived if PROSPECT in m.rcpt_tos]
    archived = [m for m in arrived if ARCHIVE in m.rcpt_tos]
    assert letters and archived
    assert archived[0].data == letters[0].data  # the very bytes, signature and all
    assert b"X-Sealrelay-Consent" not in archived[0].data  # the letter, not the offer
    async with site.relay.db.transaction() as session:
        queued = (
            await session.scalars(
                select(Event).where(Event.type == "delivery.queued").order_by(Event.id)
            )
        ).all()
    assert {e.data["recipient"] for e in queued} == {PROSPECT, ARCHIVE}


@pytest.mark.parametrize(
    ("language", "subject"),
    [
        ("de", "Ohne Zustimmung abgelaufen: Villa Bcc: x@evil.example am See – p@example.com"),
        ("en", "Expired without consent: Villa Bcc: x@evil.example am See – p@example.com"),
        ("es", "Caducado sin consentimiento: Villa Bcc: x@evil.example am See – p@example.com"),
    ],
)
def test_the_notice_reads_in_each_language_and_keeps_values_on_one_line(
    language: str, subject: str
) -> None:
    from datetime import UTC, datetime

    from gateway.letters.expiry_notice import ExpiredLetter, expiry_notice_mail
    from gateway.mail.own_mail import render

    moment = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    mail = expiry_notice_mail(
        ExpiredLetter(
            letter_id="0123456789abcdef0123",
            recipient="p@example.com",
            offer_subject="Villa\r\nBcc: x@evil.example\r\n am See",
            letter_sent=moment,
            expired=moment,
        ),
        agent_address=AGENT,
        console="https://relay.broker.example/console/messages/0190aa55bb66cc77dd88",
        language=language,
        zone="Europe/Berlin",
    )
    raw = render(
        mail, sender="postmaster@broker.example", hostname="relay.broker.example", now=moment
    )
    assert b"\r\nBcc:" not in raw and b"\n\n" not in raw.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    assert parsed["Subject"] == subject
    assert parsed["Content-Language"] == language
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "0123456789abcdef0123" in text and "{" not in text
