"""A link scanner's window runs from the delivery of the recipient's copy, not from the link's
creation: a copy deferred for ten minutes is fetched by the recipient's mail gateway seconds
after it finally arrives, and that fetch must not count as the prospect's first look.
A running relay (its tests' own address standing for a data centre), SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re

import pytest
from sqlalchemy import select

from gateway.store.models import Delivery
from tests.console.work_world import BUYER, download_token
from tests.letter_fixtures import StartSite
from tests.letter_site import PERSON_UA, Clock, LetterSite, offer
from tests.queue_wait import queue_idle

DEFER = "451 4.3.0 Try again later"


@pytest.fixture
async def site(site_factory: StartSite) -> LetterSite:
    return await site_factory(scanners={"networks": ["127.0.0.0/8"], "shipped_networks": False})


async def deferred_once(site: LetterSite) -> None:
    async def attempts() -> int:
        async with site.relay.db.transaction() as session:
            rows = await session.scalars(
                select(Delivery.attempts).where(Delivery.recipient == BUYER)
            )
            return sum(rows.all())

    async with asyncio.timeout(30):
        while await attempts() == 0:
            await asyncio.sleep(0.05)


async def test_a_fetch_seconds_after_a_late_delivery_is_a_scanners(
    site: LetterSite, clock: Clock
) -> None:
    site.sink.refuse[BUYER] = DEFER
    await site.harness.send(offer(subject="Unterlagen Villa am See"), recipients=[BUYER])
    await deferred_once(site)  # the link exists; its copy waits in the queue

    clock.advance(minutes=10)
    count = len(site.sink.messages)
    del site.sink.refuse[BUYER]
    [copy] = await site.sink.expect(count + 1)
    await queue_idle(site.relay.db)
    token = download_token(copy.data)

    clock.advance(seconds=5)  # the recipient's gateway fetches the link as the copy lands
    response, _ = await site.get(f"/d/{token}")
    assert response.status == 200
    [scanner] = await site.events("link.viewed")
    assert scanner.data.get("automated") is True, scanner.data
    [reason] = scanner.data["automated_reasons"]
    assert re.fullmatch(r"configured address, no cookie, [5-9] s after delivery", reason), reason

    clock.advance(minutes=3)  # past the window: the same address is a person (a VPN)
    await site.get(f"/d/{token}", headers={"User-Agent": PERSON_UA})
    _, person = await site.events("link.viewed")
    assert "automated" not in person.data, person.data
