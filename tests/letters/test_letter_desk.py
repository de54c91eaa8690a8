"""The letter desk's own methods without the pages, on SQLite and PostgreSQL: the view, what an
expired letter tells its page, and the request for a new link."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway.letters.desk import LetterDesk, LetterExpired, LetterUnknown
from gateway.links.tokens import Closed, TokenClosed, TokenUnknown, new_token
from gateway.store.models import Link
from tests.letter_site import PROSPECT, Clock, LetterSite, offer


def counting_desk(site: LetterSite, clock: Clock) -> tuple[LetterDesk, list[int]]:
    """A desk on the site's database whose queue wake-ups are counted."""
    woken: list[int] = []
    letters = site.relay.letters
    desk = LetterDesk(letters.settings, letters.db, letters.blobs, lambda: woken.append(1), clock)
    return desk, woken


async def test_view_is_journaled(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    found = await desk.find(token)
    await desk.record_view(found, "192.0.2.4", "Browser/1")
    [event] = await site.events("letter.viewed")
    assert event.message_id == found.letter.message_id
    assert event.data == {
        "letter_id": found.letter.id,
        "recipient": PROSPECT,
        "ip": "192.0.2.4",
        "user_agent": "Browser/1",
    }


async def test_lookups_raise_the_shared_token_states(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    with pytest.raises(LetterUnknown) as unknown:
        await desk.find(new_token())
    assert isinstance(unknown.value, TokenUnknown)
    letter = await site.letter_row()
    async with site.relay.db.transaction() as session:
        link = await session.scalar(select(Link).where(Link.id == letter.link_id))
        assert link is not None
    clock.advance(days=30)
    with pytest.raises(LetterExpired) as expired:
        await desk.find(token)
    assert isinstance(expired.value, TokenClosed)
    assert expired.value.reason is Closed.EXPIRED
    assert expired.value.expires_at == link.expires_at
    assert expired.value.letter.id == letter.id


async def test_a_new_link_is_asked_for_once_a_day(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer(offer(big=False))
    clock.advance(days=30)
    desk, woken = counting_desk(site, clock)
    with pytest.raises(LetterExpired) as expired:
        await desk.find(token)
    letter, message = expired.value.letter, expired.value.message
    assert await desk.request_new_link(letter, message, "192.0.2.5") is True
    assert await desk.request_new_link(letter, message, "192.0.2.5") is False
    assert woken == [1]
    clock.advance(hours=24, seconds=1)
    assert await desk.request_new_link(letter, message, "192.0.2.6") is True
    assert woken == [1, 1]
    requested = await site.events("letter.renewal_requested")
    assert [e.data["ip"] for e in requested] == ["192.0.2.5", "192.0.2.6"]
    assert all(e.data["letter_id"] == letter.id for e in requested)


async def test_no_new_link_is_asked_for_without_an_agent(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer(offer(big=False))
    clock.advance(days=30)
    desk, woken = counting_desk(site, clock)
    with pytest.raises(LetterExpired) as expired:
        await desk.find(token)
    expired.value.message.sender = ""
    assert await desk.request_new_link(expired.value.letter, expired.value.message, "ip") is False
    assert woken == []
    assert await site.events("letter.renewal_requested") == []
