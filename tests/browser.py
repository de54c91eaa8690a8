"""Debian's Chromium through Playwright, for every test that looks at a page or a mail.

Playwright's own browser builds are never used; without either the test fails with what to
install, it never skips.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
# Headless Chromium names itself "HeadlessChrome", which the relay rightly takes for a link
# scanner (rules/automated_visits.py); the pages' visitors in these tests are people.
CHROMIUM_ARGS.append(
    "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)


def playwright_api() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: .venv/bin/pip install -e '.[test]'", pytrace=False
        )
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y chromium"
            " (Playwright's own browser downloads are not used)",
            pytrace=False,
        )
    return async_playwright


async def assert_error_page_reads_clean(
    url: str, *, locale: str, status: int, text: str, shots: Path, name: str
) -> None:
    """An error page as Chromium draws it at phone and desktop size: `status`, `text` in
    the expected language, no markup or catalog key, nothing wider than the screen; each
    drawing kept as `shots`/`name`-{phone,desktop}.png to look at."""
    async with playwright_api()() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for size, viewport in (("phone", PHONE), ("desktop", {"width": 1280, "height": 800})):
                page = await browser.new_page(viewport=viewport, locale=locale)
                response = await page.goto(url)
                assert response is not None and response.status == status
                body = await page.locator("body").inner_text()
                assert text in body
                assert not re.search(r"[<>{}]|error\.|_title", body), body
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"]
                await page.screenshot(path=str(shots / f"{name}-{size}.png"))
                await page.close()
        finally:
            await browser.close()
