"""The download page in a real headless Chromium on a phone-sized screen.

Uses Debian's /usr/bin/chromium through Playwright (never Playwright's own browser builds).
Without either the test fails with a message saying what to install; it never skips.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.links.test_downloads import LOGO, Clock, Pages, clock, pages  # noqa: F401 (fixtures)

# the brokerage's logo, answered by the test itself: the browser reaches no other host
LOGO_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="240" height="48" viewBox="0 0 240 48">'
    '<rect x="2" y="8" width="32" height="32" rx="4" fill="none" stroke="#fff" stroke-width="3"/>'
    '<path d="M10 32V18l8 8 8-8v14" fill="none" stroke="#fff" stroke-width="3"/>'
    '<text x="46" y="23" fill="#fff" font-family="Georgia,serif" font-size="17">'
    "Müller &amp; Söhne</text>"
    '<text x="46" y="40" fill="#fff" font-family="Arial,sans-serif" font-size="10"'
    ' letter-spacing="3">IMMOBILIEN</text></svg>'
).encode()
SCREENSHOT_COPY = os.environ.get("SEALRELAY_SCREENSHOT")  # e.g. /tmp/download-page.png


# one database is enough here: the page and its journal are covered on both in test_downloads
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_phone_sees_the_files_and_downloads_one(pages: Pages, tmp_path: Path) -> None:  # noqa: F811
    async_playwright = playwright_api()
    expose = os.urandom(3 * 1024 * 1024)
    made = await pages.link(
        [
            ("Exposé Müllerstraße 12, 80331 München.pdf", "application/pdf", expose),
            ("Grundriss Erdgeschoss.pdf", "application/pdf", os.urandom(850_000)),
            ("Rundgang Wohnzimmer.mp4", "video/mp4", os.urandom(1_200_000)),
        ],
        subject="Ihr Exposé: Altbauwohnung Müllerstraße 12",
    )

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport=PHONE,
                device_scale_factor=2,
                is_mobile=True,
                has_touch=True,
                locale="de-DE",
                java_script_enabled=False,
                accept_downloads=True,
            )
            await context.route(
                LOGO, lambda route: route.fulfill(body=LOGO_SVG, content_type="image/svg+xml")
            )
            page = await context.new_page()
            blocked: list[str] = []
            page.on("console", lambda m: blocked.append(m.text) if m.type == "error" else None)
            response = await page.goto(pages.url + made.path())
            assert response is not None and response.status == 200

            files = page.get_by_role("list").get_by_role("link")
            assert await files.count() == 3
            first = files.first
            assert await first.is_visible()
            assert "Exposé Müllerstraße 12, 80331 München.pdf" in await first.inner_text()
            assert "3,1 MB" in await first.inner_text()
            assert await page.get_by_role("link", name="Alle herunterladen").is_visible()
            assert await page.get_by_text("Verfügbar bis 21.02.2027").is_visible()
            # mobile first: nothing wider than the phone, tap targets of at least 44 px
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"]
            box = await first.bounding_box()
            assert box is not None and box["height"] >= 44
            # the stylesheets loaded under the strict CSP (the brand bar has the brand colour)
            colour = await page.locator(".brand").evaluate(
                "e => getComputedStyle(e).backgroundColor"
            )
            assert colour == "rgb(138, 21, 56)"
            assert not blocked, blocked

            shot = tmp_path / "download-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            if SCREENSHOT_COPY:
                shutil.copy(shot, SCREENSHOT_COPY)

            async with page.expect_download() as waiting:
                await first.click()
            download = await waiting.value
            assert download.suggested_filename == "Exposé Müllerstraße 12, 80331 München.pdf"
            saved = tmp_path / "saved.pdf"
            await download.save_as(saved)
            assert hashlib.sha256(saved.read_bytes()).hexdigest() == (
                hashlib.sha256(expose).hexdigest()
            )
            await context.close()
        finally:
            await browser.close()

    types = [event.type for event in await pages.events()]
    assert types == ["link.viewed", "download.first"]
