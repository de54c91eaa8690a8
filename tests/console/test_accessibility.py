"""Every page a person reads, checked by axe-core (WCAG 2.1 A and AA: labels, names, contrast,
landmarks, language) in Chromium at phone and desktop size.

The console is crawled from its home page as an admin, so a page added later is checked
without a change here; the prospect's letter and download pages are opened by their links.
A page with a serious or critical violation fails with the rule, the element and axe's
advice. A page with a known fault is checked first, so a silent axe cannot pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urldefrag, urlsplit

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import PASSWORD
from tests.console.work_world import ADMIN, World, build_world
from tests.letter_site import LetterSite

DESKTOP = {"width": 1280, "height": 800}
WCAG = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
BLOCKING = {"serious", "critical"}
# Files, not pages, and the one page that ends the session.
NOT_PAGES = (".pdf", ".eml", ".css", "/logout", "/logout-everywhere", "/openapi.json")
MAX_PAGES = 60
CANARY = '<html lang="en"><body><main><input type="text"></main></body></html>'


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


def axe_engine() -> Any:
    try:
        from axe_playwright_python.async_playwright import Axe
    except ImportError:
        pytest.fail(
            "axe-playwright-python is not installed: .venv/bin/pip install -e '.[test]'",
            pytrace=False,
        )
    return Axe()


def problems(url: str, response: dict[str, Any]) -> list[str]:
    found = []
    for violation in response["violations"]:
        if violation["impact"] not in BLOCKING:
            continue
        for node in violation["nodes"][:3]:
            found.append(
                f"{url}: {violation['id']} ({violation['impact']}): {violation['help']}\n"
                f"    at {node['target']}: {node.get('failureSummary', '')}"
            )
    return found


async def console_pages(page: Any, base: str) -> AsyncIterator[str]:
    """Same-origin console pages reachable from the home page, breadth first."""
    seen: set[str] = set()
    queue = [f"{base}/console/"]
    while queue and len(seen) < MAX_PAGES:
        url = queue.pop(0)
        if url in seen:
            continue
        seen.add(url)
        response = await page.goto(url)
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        yield url
        hrefs = await page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
        for href in hrefs:
            target, _ = urldefrag(href)
            parts = urlsplit(target)
            if (
                target.startswith(base)
                and parts.path.startswith("/console")
                and not parts.path.endswith(NOT_PAGES)
                and target not in seen
            ):
                queue.append(target)
    assert len(seen) < MAX_PAGES, "the crawl did not end: more pages than expected"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("viewport", "locale"), [(PHONE, "de-DE"), (DESKTOP, "en-GB")])
async def test_every_page_passes_axe(world: World, viewport: dict[str, int], locale: str) -> None:
    axe = axe_engine()
    base = world.url
    found: list[str] = []
    checked: list[str] = []
    async with playwright_api()() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            prospect = await browser.new_page(viewport=viewport, locale=locale)
            await prospect.set_content(CANARY)
            canary = problems("canary", (await axe.run(prospect, options=WCAG)).response)
            assert any("label" in line for line in canary), canary  # axe runs and reports
            for path in (f"/l/{world.letter_token}", f"/d/{world.link_token}"):
                await prospect.goto(base + path)
                found += problems(path, (await axe.run(prospect, options=WCAG)).response)
                checked.append(path)
            await prospect.goto(f"{base}/console/login")
            found += problems("/console/login", (await axe.run(prospect, options=WCAG)).response)

            await prospect.locator("#email").fill(ADMIN)
            await prospect.locator("#password").fill(PASSWORD)
            await prospect.locator("form button[type=submit]").click()
            async for url in console_pages(prospect, base):
                found += problems(url, (await axe.run(prospect, options=WCAG)).response)
                checked.append(url)
        finally:
            await browser.close()
    assert len(checked) >= 8, checked
    assert not found, "\n".join(found)
