"""The admin's user pages and the account page in Chromium, without JavaScript, on a phone
(German) and a desktop (English): the admin opens a user, adds an alias, resets the password
(shown once), turns off the TOTP of someone who lost their phone, deletes another user after
the confirmation page; an agent sets their notice mails and changes their own password.

Screenshots go to the test's tmp dir and to /work/wt/screens/admin-users/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from gateway import users
from gateway.console import totp
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.console.browser_sign_in import sign_in
from tests.console.test_browser_console_work import DESKTOP, SIZES
from tests.console.work_world import ADMIN, AGENT, OTHER_AGENT, World, build_world
from tests.letter_site import LetterSite

SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/admin-users"))
assert DESKTOP and PHONE


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


async def take(page: Any, tmp_path: Path, name: str, size: str, width: int) -> None:
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"{name}: the page is {scroll} px wide on a {width} px screen"
    shot = tmp_path / f"{name}-{size}.png"
    await page.screenshot(path=str(shot), full_page=True)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENS / shot.name)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_admin_manages_users_and_an_agent_their_account(
    world: World, tmp_path: Path, size: str, viewport: dict[str, int], locale: str
) -> None:
    german = locale.startswith("de")
    width = viewport["width"]
    db = world.site.relay.db
    async with playwright_api()() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            await totp.enable(db, AGENT)
            page = await sign_in(browser, world.url, ADMIN, viewport, locale)
            await page.goto(f"{world.url}/console/admin/users")
            row = page.locator("li.row", has_text=AGENT)
            await row.locator("summary").click()
            await row.locator("input[name=address]").fill("desk@broker.example")
            await row.locator("form[action='/console/admin/users/aliases'] button").click()
            assert "alias_added" in page.url
            row = page.locator("li.row", has_text=AGENT)
            await row.locator("summary").click()
            await take(page, tmp_path, "users", size, width)

            await row.locator("form[action='/console/admin/users/password'] button").click()
            password = (await page.locator(".secret-value").inner_text()).strip()
            assert await users.authenticate(db, AGENT, password) is not None
            await take(page, tmp_path, "password-once", size, width)

            row = page.locator("li.row", has_text=AGENT)
            await row.locator("summary").click()
            await row.locator("form[action='/console/admin/users/totp-off'] button").click()
            assert page.url.endswith("done=totp_off")
            assert (await users.find_user(db, AGENT))[0].totp_secret is None
            await take(page, tmp_path, "totp-off", size, width)

            row = page.locator("li.row", has_text=OTHER_AGENT)
            await row.locator("summary").click()
            await row.get_by_role(
                "link", name="Benutzer/in löschen…" if german else "Delete user…"
            ).click()
            assert "/console/admin/users/delete" in page.url
            await take(page, tmp_path, "delete-confirm", size, width)
            await page.locator("form[action='/console/admin/users/delete'] button").click()
            assert page.url.endswith("done=user_deleted")
            assert OTHER_AGENT not in await page.locator("main").inner_text()
            await take(page, tmp_path, "user-deleted", size, width)

            await users.set_password(db, AGENT, "correct horse battery")
            agent = await sign_in(browser, world.url, AGENT, viewport, locale)
            await agent.get_by_role("link", name="Mein Konto" if german else "My account").click()
            await agent.locator("#notice-expiry").uncheck()
            await agent.locator("form[action='/console/account/notices'] button").click()
            assert agent.url.endswith("done=notices_saved")
            prefs = await users.notifications(db, AGENT, world.site.relay.settings)
            assert prefs.first_download and not prefs.expiry_warning
            await agent.locator("#current-password").fill("wrong password")
            await agent.locator("#new-password").fill("a brand new password")
            await agent.locator("#repeat-password").fill("a brand new password")
            await agent.locator("form[action='/console/account/password'] button").click()
            assert await agent.locator("#password-error").count() == 1
            await take(agent, tmp_path, "account", size, width)
        finally:
            await browser.close()
