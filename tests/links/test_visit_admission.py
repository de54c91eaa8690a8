"""Prospects' visits use the database under an admission limit (gateway/store/admission.py):
with the visits' share in use, a visit is answered 503 with Retry-After at once, writes
nothing, and the relay's own work goes on. Real SMTP, real HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from gateway.store.models import Event
from tests.conftest import AGENT, Harness, StartRelay
from tests.support import PERSON_UA, chained
from web.app import ADMISSION

PROSPECT = "prospect@example.com"
LINK = re.compile(r"http://127\.0\.0\.1:8080/d/([A-Za-z0-9_-]{43})")
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8192


def mail(subject: str, attachment: bytes | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = AGENT
    message["To"] = PROSPECT
    message["Subject"] = subject
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n")
    if attachment is not None:
        message.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="expose.pdf"
        )
    return message


@pytest.fixture
async def relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory(
        smtp={"max_message_size": 8 * 1024 * 1024}, web={"visit_db_limit": 2, "visit_wait": 0.2}
    )


async def visit_events(relay: Harness) -> list[str]:
    async with relay.relay.db.transaction() as session:
        types = (await session.scalars(select(Event.type).order_by(Event.id))).all()
    return [t for t in types if t.startswith(("link.viewed", "download."))]


async def metric(http: aiohttp.ClientSession, relay: Harness, name: str) -> float:
    async with http.get(f"{relay.web_url}/metrics") as response:
        [value] = re.findall(rf"^{name} (\S+)$", await response.text(), re.MULTILINE)
    return float(value)


async def test_saturated_visits_get_503_and_the_mail_goes_on(relay: Harness) -> None:
    await relay.send(mail("Exposé", PDF), recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    [token] = set(LINK.findall(copy.data.decode("ascii", "replace")))
    runner = relay.relay._web_runner
    assert runner is not None
    slots = runner.app[ADMISSION].slots
    page, file_path = f"{relay.web_url}/d/{token}", ""

    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(page) as response:
            assert response.status == 200
            [file_path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', await response.text())
        turned_away = await metric(http, relay, "sealrelay_web_visits_turned_away_total")
        for _ in range(2):
            await slots.acquire()  # every slot the visits may use, taken
        try:
            for path, language, text in (
                (page, "de", "zu viele Besucher"),
                (f"{relay.web_url}{file_path}", "es", "demasiados visitantes"),
            ):
                started = time.monotonic()
                async with http.get(path, headers={"Accept-Language": language}) as response:
                    assert response.status == 503
                    assert response.headers["Retry-After"] == "5"
                    assert text in await response.text()
                assert time.monotonic() - started < 10  # not the pool's 30 s wait
            # the relay's own work takes no slot: mail is accepted and delivered meanwhile
            await relay.send(mail("Termin"), recipients=[PROSPECT])
            first, small = await relay.sink.expect(2)
            assert b"Termin" in small.data and b"Termin" not in first.data
        finally:
            slots.release()
            slots.release()
        assert await visit_events(relay) == ["link.viewed"], "a visit turned away wrote nothing"
        assert await metric(http, relay, "sealrelay_web_visits_turned_away_total") == (
            turned_away + 2
        )

        async with http.get(f"{relay.web_url}{file_path}") as response:
            assert response.status == 200
            assert await response.read() == PDF
    assert await visit_events(relay) == ["link.viewed", "download.first"]
    assert (await chained(relay.relay.db)).ok


async def test_the_busy_page_reads_clean_on_a_phone_and_a_desktop(
    relay: Harness, tmp_path: Path
) -> None:
    """What a prospect sees when turned away, as Chromium draws it: the browser's language,
    no markup or catalog key, nothing wider than the screen."""
    from tests.browser import assert_error_page_reads_clean

    await relay.send(mail("Exposé", PDF), recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    [token] = set(LINK.findall(copy.data.decode("ascii", "replace")))
    runner = relay.relay._web_runner
    assert runner is not None
    slots = runner.app[ADMISSION].slots
    for _ in range(2):
        await slots.acquire()
    try:
        await assert_error_page_reads_clean(
            f"{relay.web_url}/d/{token}",
            locale="de-DE",
            status=503,
            text="zu viele Besucher",
            shots=tmp_path,
            name="busy",
        )
    finally:
        slots.release()
        slots.release()
