"""The "access ended" page of a revoked link in Chromium, on a phone and a desktop, in German,
English and Spanish: its own words (never "expired"), no offer of a new link, readable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.links.test_browser_downloads import LOGO_SVG
from tests.links.test_downloads import LOGO, Clock, Pages, clock, pages  # noqa: F401 (fixtures)
from tests.support import screenshot_dir

DESKTOP = {"width": 1280, "height": 800}
TITLES = {"de": "Zugang beendet", "en": "Access ended", "es": "Acceso finalizado"}
EXPIRED = {"de": "abgelaufen", "en": "expired", "es": "caducado"}
COPY_TO = Path("/work/wt/screens/actions")


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_revoked_link_says_access_ended(pages: Pages, tmp_path: Path) -> None:  # noqa: F811
    async_playwright = playwright_api()
    made = {
        language: await pages.link(language=language, subject="Ihr Exposé: Seeblick")
        for language in TITLES
    }
    for link in made.values():
        assert await pages.relay.links.revoke(
            link.message_id,
            "prospect@example.com",
            "anna@broker.example",
            "sent to the wrong client",
        )
    shots = screenshot_dir("access-ended")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for size_name, viewport, mobile in (
                ("phone", PHONE, True),
                ("desktop", DESKTOP, False),
            ):
                context = await browser.new_context(
                    viewport=viewport,
                    device_scale_factor=2 if mobile else 1,
                    is_mobile=mobile,
                    has_touch=mobile,
                    java_script_enabled=False,
                )
                await context.route(
                    LOGO, lambda route: route.fulfill(body=LOGO_SVG, content_type="image/svg+xml")
                )
                page = await context.new_page()
                for language, link in made.items():
                    response = await page.goto(pages.url + link.path())
                    assert response is not None and response.status == 410
                    heading = await page.locator("h1").inner_text()
                    assert heading == TITLES[language]
                    text = await page.locator("main").inner_text()
                    assert EXPIRED[language] not in text.lower()
                    assert await page.locator("form, a.button").count() == 0
                    # nothing runs off the screen
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    assert width <= viewport["width"]
                    shot = tmp_path / f"access-ended-{language}-{size_name}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    shutil.copy(shot, shots / shot.name)
                    COPY_TO.mkdir(parents=True, exist_ok=True)
                    shutil.copy(shot, COPY_TO / shot.name)
                await context.close()
        finally:
            await browser.close()
