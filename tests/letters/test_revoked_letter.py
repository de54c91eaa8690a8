"""A held letter whose link the agent revoked stays revoked: the relay's sweep neither warns
the agent that it is about to expire nor marks it expired and tells them so, and the
console shows "revoked" throughout. Sending it again makes it wait for consent once more.
A running relay with a clock the test moves on; SQLite and PostgreSQL; the message page in
Chromium on a phone and a desktop."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from gateway.store.models import Delivery, LetterStatus
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT, PASSWORD
from tests.console.browser_sign_in import sign_in
from tests.console.client import ConsoleClient, hidden_fields
from tests.console.test_console_work import visible
from tests.letter_site import PROSPECT, Clock, LetterSite, offer

SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/trust-fixes"))
REVOKED = "letter link revoked"
BADGE = re.compile(r'<span class="badge badge-(\w+)">([^<]+)</span>')


async def to_agent(site: LetterSite) -> int:
    return await site.count(Delivery, Delivery.recipient == AGENT)


async def console(site: LetterSite) -> ConsoleClient:
    """Signed in anew: the moved clock has ended any earlier session."""
    browser = ConsoleClient(site.url)
    assert (await browser.sign_in(AGENT, PASSWORD)).status == 303
    return browser


async def state_shown(site: LetterSite, message_id: str) -> tuple[list[str], list[str], str]:
    """The recipient's state badges on the message page and in the list, and the letters
    waiting as the page reads."""
    async with await console(site) as browser:
        page = (await browser.get(f"/console/messages/{message_id}")).text
        listing = (await browser.get("/console/messages")).text
        waiting = visible((await browser.get("/console/letters")).text)
    return BADGE.findall(page), BADGE.findall(listing), waiting


async def test_a_revoked_letter_is_neither_warned_about_nor_expired(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    path = f"/console/messages/{letter.message_id}"
    async with await console(site) as browser:
        fields = hidden_fields((await browser.get(path)).text)
        answer = await browser.post(
            f"{path}/revoke", {"csrf": fields["csrf"], "recipient": PROSPECT, "reason": "sold"}
        )
        assert answer.status == 303, answer.text
    response, _ = await site.get(f"/l/{token}")
    assert response.status == 410
    page, listing, waiting = await state_shown(site, letter.message_id)
    assert page == listing == [("revoked", REVOKED)]
    assert PROSPECT not in waiting, "no one can consent to a revoked letter"

    clock.advance(days=12, hours=12)  # inside the warning window
    await site.relay.sweep_once()
    assert await site.events("letter.expiry_warned") == []
    clock.advance(days=2)  # past the link's expiry
    report = await site.relay.sweep_once()
    assert report.letters_expired == 0
    assert await site.events("letter.expired") == []
    assert await to_agent(site) == 0, "the agent revoked it: no warning, no expiry notice"
    stored = await site.letter_row()
    assert stored.status == LetterStatus.HELD and stored.expiry_warned_at is None
    page, listing, waiting = await state_shown(site, letter.message_id)
    assert page == listing == [("revoked", REVOKED)], "not expired"
    async with await console(site) as browser:
        expired = visible((await browser.get("/console/messages?state=expired")).text)
        revoked = visible((await browser.get("/console/messages?state=revoked")).text)
    assert "Villa am See" not in expired and "Villa am See" in revoked

    # sent again, the letter waits for consent with a fresh link (and may expire again)
    async with await console(site) as browser:
        fields = hidden_fields((await browser.get(path)).text)
        answer = await browser.post(f"{path}/letters/{letter.id}/resend", {"csrf": fields["csrf"]})
        assert answer.status == 303, answer.text
    page, _, waiting = await state_shown(site, letter.message_id)
    assert page == [("letter_waiting", "letter waiting")] and PROSPECT in waiting


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_revoked_state_reads_clean_on_a_phone_and_a_desktop(
    site: LetterSite, tmp_path: Path
) -> None:
    await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    await site.relay.links.revoke(letter.message_id, PROSPECT, AGENT, "sold elsewhere")
    async_playwright = playwright_api()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for size, viewport, locale, label in (
                ("phone", PHONE, "de-DE", "Zugang zum Brief beendet"),
                ("desktop", {"width": 1280, "height": 800}, "en-GB", REVOKED),
            ):
                page = await sign_in(browser, site.url, AGENT, viewport, locale)
                await page.goto(f"{site.url}/console/messages/{letter.message_id}")
                text = await page.locator("main").inner_text()
                assert label in text
                # access is ended already and cannot be extended: only sending again is offered
                assert await page.locator("form[action$='/revoke']").count() == 0
                assert await page.locator("form[action$='/extend']").count() == 0
                assert await page.locator("form[action$='/resend']").count() == 1
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"]
                shot = tmp_path / f"revoked-letter-{size}.png"
                await page.screenshot(path=str(shot), full_page=True)
                SCREENS.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, SCREENS / shot.name)
                await page.context.close()
        finally:
            await browser.close()
