"""The agent is warned once, shortly before a waiting letter's link runs out.

A running relay with a clock the test moves on; the warning comes from the relay's own sweep
(serve's housekeeping round). The letter's link is valid 14 days; the warning goes 2 days
before (``[notices] expiry_warning_days``). SQLite and PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta

import dkim as dkimpy
from sqlalchemy import select

from gateway import users
from gateway.mail import headers
from gateway.store.models import Delivery, Letter, Link, Message
from tests.conftest import AGENT, dkim_dns
from tests.letter_site import PROSPECT, Clock, LetterSite
from tests.support import chained
from web.console.paths import ACCOUNT


async def to_agent(site: LetterSite) -> int:
    return await site.count(Delivery, Delivery.recipient == AGENT)


def text_of(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def test_one_warning_two_days_before_the_link_runs_out(
    site: LetterSite, clock: Clock
) -> None:
    await site.send_offer()
    clock.advance(days=11, hours=23)
    await site.relay.sweep_once()
    assert await to_agent(site) == 0  # more than two days left

    clock.advance(hours=1, seconds=1)
    await site.relay.sweep_once()
    await site.relay.sweep_once()
    assert await to_agent(site) == 1
    [warned] = await site.events("letter.expiry_warned")
    letter = await site.letter_row()
    assert letter.expiry_warned_at is not None
    assert warned.data["letter_id"] == letter.id and warned.data["recipient"] == PROSPECT

    arrived = await site.sink.expect(2)
    [notice] = [m for m in arrived if m.rcpt_tos == [AGENT]]
    assert notice.mail_from in ("", "<>")
    fields = headers.fields_of(notice.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        f"Läuft bald ab: Villa am See – {PROSPECT}"
    )
    assert dkimpy.verify(notice.data, dnsfunc=dkim_dns(site.harness.dkim_key))
    text = text_of(notice.data)
    assert f"{PROSPECT} hat dem Angebot „Villa am See“ noch nicht zugestimmt" in text
    assert f"{site.url}/console/messages/{letter.message_id}" in text
    assert f"Mein Konto“ ein:\r\n{site.url}{ACCOUNT}\r\n" in text  # where it is turned off
    assert f"Brief-ID: {letter.id}" in text
    async with site.relay.db.snapshot() as session:
        row = await session.get(Message, warned.data["notice_message_id"])
        assert row is not None and row.kind == "confirmation"

    clock.advance(days=2)  # expired now: the expiry notice, no second warning
    report = await site.relay.sweep_once()
    assert report.letters_expired == 1
    assert len(await site.events("letter.expiry_warned")) == 1
    assert await to_agent(site) == 2
    assert (await chained(site.relay.db)).ok


async def test_no_warning_after_consent(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer()
    response = await site.consent(token)
    assert response.status in (200, 303)
    confirmations = await to_agent(site)
    assert confirmations == 1  # the consent confirmation: always, whatever the preferences
    clock.advance(days=12, hours=12)
    await site.relay.sweep_once()
    assert await site.events("letter.expiry_warned") == []
    assert await to_agent(site) == confirmations


async def test_no_warning_for_a_letter_already_expired(site: LetterSite, clock: Clock) -> None:
    await site.send_offer()
    clock.advance(days=15)  # the relay was down through the warning window
    report = await site.relay.sweep_once()
    assert report.letters_expired == 1
    assert await site.events("letter.expiry_warned") == []
    assert await to_agent(site) == 1  # the expiry notice only


async def test_an_agent_who_turned_it_off_is_not_warned_and_it_never_comes_late(
    site: LetterSite, clock: Clock
) -> None:
    await users.set_notifications(
        site.relay.db, AGENT, {"expiry_warning": False}, site.harness.settings
    )
    await site.send_offer()
    clock.advance(days=12, hours=1)
    await site.relay.sweep_once()
    assert await to_agent(site) == 0
    assert await site.events("letter.expiry_warned") == []
    async with site.relay.db.snapshot() as session:
        [letter] = (await session.scalars(select(Letter))).all()
    assert letter.expiry_warned_at is not None  # looked at: turning it on again sends no late one

    await users.set_notifications(
        site.relay.db, AGENT, {"expiry_warning": True}, site.harness.settings
    )
    clock.advance(hours=1)
    await site.relay.sweep_once()
    assert await to_agent(site) == 0


async def test_an_extended_link_earns_one_warning_for_its_new_date(
    site: LetterSite, clock: Clock
) -> None:
    await site.send_offer()
    clock.advance(days=12, hours=1)
    await site.relay.sweep_once()
    assert len(await site.events("letter.expiry_warned")) == 1

    letter = await site.letter_row()
    async with site.relay.db.snapshot() as session:
        link = await session.get(Link, letter.link_id)
    assert link is not None
    await site.relay.links.extend(link.id, link.expires_at + timedelta(days=7), AGENT)
    await site.relay.sweep_once()
    assert len(await site.events("letter.expiry_warned")) == 1  # 8 days left: no warning yet

    clock.advance(days=7)  # 2 days minus an hour before the new date
    await site.relay.sweep_once()
    await site.relay.sweep_once()
    warnings = await site.events("letter.expiry_warned")
    assert len(warnings) == 2
    assert warnings[1].data["expires_at"] == (link.expires_at + timedelta(days=7)).isoformat()
    assert await to_agent(site) == 2
