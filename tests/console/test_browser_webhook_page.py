"""A webhook endpoint's console page in Chromium, without JavaScript, on a phone (German) and a
desktop (English): the admin sends a test and reads its answer, a refused one too, replays a
time range, rotates the secret and sees the forms to change the endpoint.

Screenshots go to the test's tmp dir and to /work/wt/screens/webhook-console/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, playwright_api
from tests.console.test_browser_console_work import SIZES, Screens, sign_in
from tests.console.work_world import ADMIN, World, build_world
from tests.letter_site import LetterSite
from tests.webhooks.receiver import Answer, Receiver

SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/webhook-console"))


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()


async def answered(page: Any) -> str:
    """The page's text once the test's answer is recorded (the page reloads itself until
    then; without JavaScript the test reloads it the same way)."""
    async with asyncio.timeout(30):
        while await page.locator("meta[http-equiv=refresh]").count():
            await asyncio.sleep(0.1)
            await page.reload()
    return str(await page.locator("main").inner_text())


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_the_endpoint_page_tests_replays_and_rotates(
    world: World,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: str,
    viewport: dict[str, int],
    locale: str,
) -> None:
    monkeypatch.setattr("tests.console.test_browser_console_work.SCREENS", SCREENS)
    async_playwright = playwright_api()
    german = locale.startswith("de")
    base = world.url
    shots = Screens(tmp_path, size)
    zone = ZoneInfo(world.site.harness.settings.branding.timezone)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await sign_in(browser, base, ADMIN, viewport, locale)
            await page.goto(f"{base}/console/admin/webhooks")
            await page.locator("#url").fill(receiver.url)
            await page.locator("#description").fill("CRM Nord")
            await page.locator("#event_types").fill("message.received webhook.test")
            await page.locator("#allow_private").check()
            await page.locator("form[action='/console/admin/webhooks'] button").click()
            await page.locator("a.addr").first.click()

            await page.locator("form[action$='/test'] button").click()
            text = await answered(page)
            assert ("angenommen" if german else "accepted the test event") in text
            await shots.take(page, "webhook-test-accepted", viewport["width"])

            receiver.answers = [Answer(503)]
            await page.locator("form[action$='/test'] button").click()
            text = await answered(page)
            assert "HTTP 503" in text
            await shots.take(page, "webhook-test-refused", viewport["width"])

            now = world.site.clock().astimezone(zone).replace(tzinfo=None)
            await page.locator("#since").fill((now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"))
            await page.locator("#until").fill((now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"))
            await page.locator("form[action$='/replay-range'] button").click()
            assert "202" not in page.url.rsplit("/", 1)[-1]  # the port or id may hold 202
            await shots.take(page, "webhook-replayed", viewport["width"])

            await page.locator("form[action$='/rotate-secret'] button").click()
            assert "whsec_" in await page.locator(".secret-value").inner_text()
            await shots.take(page, "webhook-rotated", viewport["width"])
        finally:
            await browser.close()
