"""`verify --journal` while mail flows: it must never report a break that is not there.

Verification reads many batches of events and the chain's head; on PostgreSQL each statement
of a READ COMMITTED transaction sees what was committed when it started, so a verifier that
reads the head last sees events it did not walk. A relay carries offers, downloads and
consents while a second connection, as `sealrelay verify --journal` would, verifies again
and again. Every verification must say OK. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import text

from gateway.store import journal
from gateway.store.db import Database
from tests.conftest import AGENT
from tests.letter_fixtures import StartSite
from tests.letter_site import LetterSite, token_in

MESSAGES = 200
OFFER_EVERY = 5  # every fifth message is an offer the prospect consents to
SESSIONS = 8
ATTACHMENT = os.urandom(24 * 1024)  # over the test's link threshold: becomes a download link


def message(number: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"Anna Agent <{AGENT}>"
    mail["To"] = f"prospect{number}@example.com"
    mail["Message-ID"] = f"<live-{number}@broker.example>"
    if number % OFFER_EVERY == 0:
        mail["Subject"] = f"[Exposé] Wohnung {number}"
        mail.set_content(f"Guten Tag,\n\nhier ist das Exposé Nr. {number}.\n")
    else:
        mail["Subject"] = f"Unterlagen {number}"
        mail.set_content(f"Guten Tag,\n\nanbei die Unterlagen Nr. {number}.\n")
        mail.add_attachment(
            ATTACHMENT, maintype="application", subtype="pdf", filename=f"Unterlagen {number}.pdf"
        )
    return mail.as_bytes(policy=email.policy.SMTP)


def plain_text(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


@pytest.fixture
async def site(site_factory: StartSite) -> LetterSite:
    # the most a visit may wait for its share of the database: on a loaded box a consent
    # otherwise meets admission's 503 (tests/links/test_visit_admission.py), not the point here
    return await site_factory(policy={"link_attachments_over": "10KB"}, web={"visit_wait": 10})


async def second_connection(database: Database, tmp_path: Path) -> Database:
    """The same database over a connection of its own, as a `sealrelay verify` process has."""
    if not database.is_postgres:
        return Database.connect(f"sqlite+aiosqlite:///{tmp_path}/relay.db")
    async with database.transaction() as session:
        schema = await session.scalar(text("SELECT current_schema()"))
    return Database.connect(database.engine.url.render_as_string(False), schema=schema)


async def download(http: aiohttp.ClientSession, site: LetterSite, raw: bytes) -> None:
    [token] = set(re.findall(rf"{re.escape(site.url)}/d/([A-Za-z0-9_-]{{43}})", plain_text(raw)))
    async with http.get(f"{site.url}/d/{token}") as page:
        assert page.status == 200
        [path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', await page.text())
    async with http.get(f"{site.url}{path}") as file:
        assert file.status == 200
        assert await file.read() == ATTACHMENT


async def send_and_act(site: LetterSite, numbers: asyncio.Queue[int]) -> None:
    """Send the next message, wait for its copy, then download its file or consent."""
    async with aiohttp.ClientSession() as http:
        while not numbers.empty():
            number = numbers.get_nowait()
            recipient = f"prospect{number}@example.com"
            await site.harness.send(message(number), recipients=[recipient])
            async with asyncio.timeout(60):
                while not (arrived := site.sink.to(recipient)):
                    await asyncio.sleep(0.05)
            if number % OFFER_EVERY == 0:
                response = await site.consent(token_in(arrived[0].data, site.url))
                assert response.status in (200, 303), response.status
            else:
                await download(http, site, arrived[0].data)


async def test_verify_while_offers_downloads_and_consents_flow_always_says_ok(
    site: LetterSite, database: Database, tmp_path: Path
) -> None:
    verifier = await second_connection(database, tmp_path)
    numbers: asyncio.Queue[int] = asyncio.Queue()
    for number in range(MESSAGES):
        numbers.put_nowait(number)
    traffic = asyncio.gather(*(send_and_act(site, numbers) for _ in range(SESSIONS)))
    reports: list[journal.ChainReport] = []
    clock = asyncio.get_running_loop().time
    try:
        while not traffic.done():
            started = clock()
            reports.append(await journal.verify_database(verifier))
            assert reports[-1].ok, (len(reports), reports[-1])
            # an admin re-running `sealrelay verify --journal`; the verifier shares the relay's
            # event loop and each walk is longer than the last, so it rests as long as it
            # walked: the traffic keeps at least half of the loop and still ends
            await asyncio.sleep(max(0.05, clock() - started))
        await traffic
        final = await journal.verify_database(verifier)
    finally:
        traffic.cancel()
        await verifier.close()
    assert final.ok, final
    assert len(reports) >= 10, "the traffic ended before verification could overlap it"
    # the journal grew while it was verified (the last walk may end with the traffic's
    # last event, so the first is the one to compare)
    assert reports[0].events < final.events
    consents = MESSAGES // OFFER_EVERY
    assert len(site.sink.messages) >= MESSAGES + 2 * consents  # released originals, notices
