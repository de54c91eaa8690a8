"""Signing in to the console in Chromium, as a person does: the page, the form, the button."""

from __future__ import annotations

from typing import Any

from tests.browser import PHONE
from tests.conftest import PASSWORD


async def sign_in(browser: Any, base: str, who: str, viewport: dict[str, int], locale: str) -> Any:
    """A page signed in as `who` in a context of its own (no JavaScript, a phone's touch and
    pixel ratio at PHONE size), left on the console's home page."""
    phone = viewport is PHONE
    context = await browser.new_context(
        viewport=viewport,
        device_scale_factor=2 if phone else 1,
        is_mobile=phone,
        has_touch=phone,
        locale=locale,
        java_script_enabled=False,
        accept_downloads=True,
    )
    page = await context.new_page()
    page.set_default_timeout(10_000)
    await page.goto(f"{base}/console/login")
    await page.locator("#email").fill(who)
    await page.locator("#password").fill(PASSWORD)
    await page.locator("form button[type=submit]").click()
    assert page.url == f"{base}/console/", page.url
    return page
