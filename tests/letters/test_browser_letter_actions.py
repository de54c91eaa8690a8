"""What the prospect sees after an agent acted on their letter, in Chromium on a phone and a
desktop: the old link of a re-sent letter says access ended (no offer of a new link), and an
offer the agent released without consent says so and offers no declarations PDF."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.letter_site import LetterSite, offer, token_in
from tests.support import screenshot_dir

DESKTOP = {"width": 1280, "height": 800}
COPY_TO = Path("/work/wt/screens/actions")
ANNA = "anna@broker.example"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_pages_after_an_agents_action(site: LetterSite, tmp_path: Path) -> None:
    async_playwright = playwright_api()
    old_token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    await site.relay.letters.resend(letter.id, ANNA)
    await site.sink.expect(2)
    fresh = token_in(site.sink.messages[-1].data, site.url)
    await site.relay.letters.release_by_agent(letter.id, ANNA, "asked by phone")

    shots = screenshot_dir("letter-actions")
    COPY_TO.mkdir(parents=True, exist_ok=True)
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
                page = await context.new_page()
                pages = {
                    "resent-old-link": (f"/l/{old_token}", 410, "Zugang beendet"),
                    "agent-released": (f"/l/{fresh}", 200, "Das Exposé wurde Ihnen zugesandt"),
                    "agent-released-offer": (f"/l/{fresh}/offer", 200, "Villa am See"),
                }
                for name, (path, status, heading) in pages.items():
                    response = await page.goto(site.url + path)
                    assert response is not None and response.status == status
                    assert heading in await page.locator("h1").first.inner_text()
                    text = await page.locator("main").inner_text()
                    assert "abgelaufen" not in text
                    assert await page.locator("form").count() == 0
                    assert await page.locator('a[href$="consent.pdf"]').count() == 0
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    assert width <= viewport["width"]
                    shot = tmp_path / f"letter-{name}-{size_name}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    shutil.copy(shot, shots / shot.name)
                    shutil.copy(shot, COPY_TO / shot.name)
                await context.close()
        finally:
            await browser.close()
