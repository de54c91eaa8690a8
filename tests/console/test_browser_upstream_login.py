"""The own mail host login in Chromium, without JavaScript, on a phone (German) and a desktop
(English): an agent saves theirs on My account (the password field comes back empty), an
admin sees it on the users page and saves another user's.

Screenshots go to the test's tmp dir and to /work/wt/screens/agentlogin/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, playwright_api
from tests.console import test_browser_users_admin as screens
from tests.console.browser_sign_in import sign_in
from tests.console.test_browser_console_work import SIZES
from tests.console.work_world import ADMIN, AGENT, OTHER_AGENT, World, build_world
from tests.letter_site import LetterSite

SECRET = "hoster secret 7"


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_an_agent_and_an_admin_save_mail_host_logins(
    world: World,
    tmp_path: Path,
    size: str,
    viewport: dict[str, int],
    locale: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        screens, "SCREENS", Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/agentlogin"))
    )
    german = locale.startswith("de")
    width = viewport["width"]
    async with playwright_api()() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            agent = await sign_in(browser, world.url, AGENT, viewport, locale)
            await agent.get_by_role("link", name="Mein Konto" if german else "My account").click()
            await agent.locator("#own-login-url").fill("smtp://mail.webhoster.example:587")
            await agent.locator("#own-login-username").fill("anna@webhoster.example")
            await agent.locator("#own-login-password").fill(SECRET)
            await agent.locator("form[action='/console/account/upstream-login'] button").click()
            assert agent.url.endswith("done=login_saved")
            assert await agent.locator("#own-login-password").input_value() == ""
            assert SECRET not in await agent.content()
            await screens.take(agent, tmp_path, "account-login", size, width)

            await agent.locator("#own-login-url").fill("smtp://mail.webhoster.example:587")
            await agent.locator("#own-login-password").fill("x")
            await agent.locator("#own-login-url").fill("http://wrong.example")
            await agent.locator(
                "form[action='/console/account/upstream-login'] button"
            ).first.click()
            assert await agent.locator("#own-login-error").count() == 1
            await screens.take(agent, tmp_path, "account-login-error", size, width)

            admin = await sign_in(browser, world.url, ADMIN, viewport, locale)
            await admin.goto(f"{world.url}/console/admin/users")
            row = admin.locator("li.row", has_text=OTHER_AGENT)
            await row.locator("summary").click()
            await row.locator("input[name=url]").fill("smtps://mail.other.example")
            await row.locator("input[name=username]").fill("other")
            await row.locator("input[name=password]").fill(SECRET)
            await row.locator(
                "form[action='/console/admin/users/upstream-login'] button"
            ).first.click()
            assert admin.url.endswith("done=user_login_saved")
            row = admin.locator("li.row", has_text=AGENT)
            await row.locator("summary").click()
            assert "mail.webhoster.example" in await row.inner_text()
            assert SECRET not in await admin.content()
            await screens.take(admin, tmp_path, "users-login", size, width)
        finally:
            await browser.close()
