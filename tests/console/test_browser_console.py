"""Signing in to the console in Chromium, on a phone and a desktop, without JavaScript.

Screenshots go to the test's tmp dir and to /work/wt/screens/console-auth/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pyotp
import pytest

from gateway import users
from gateway.console import totp
from gateway.store.models import Role
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay
from tests.support import free_port

DESKTOP = {"width": 1280, "height": 800}
SMALLEST = {"width": 360, "height": 740}
SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/console-auth"))


def keep(shot: Path) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENS / shot.name)


async def started(relay_factory: StartRelay) -> tuple[str, Harness]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    relay = await relay_factory(
        server={"public_url": url},
        web={"listen": f"127.0.0.1:{port}"},
        branding={"company_name": "Makler Nord GmbH", "primary_color": "#8a1538"},
    )
    return url, relay


async def fits(page: Any, width: int) -> None:
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"the page is {scroll} px wide on a {width} px screen"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("size", "viewport", "locale"),
    [("phone", PHONE, "de-DE"), ("desktop", DESKTOP, "en-GB"), ("small", SMALLEST, "de-DE")],
)
async def test_sign_in_home_and_sign_out_everywhere(
    relay_factory: StartRelay, tmp_path: Path, size: str, viewport: dict[str, int], locale: str
) -> None:
    async_playwright = playwright_api()
    base, _ = await started(relay_factory)
    german = locale.startswith("de")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport=viewport,
                device_scale_factor=2 if size != "desktop" else 1,
                is_mobile=size != "desktop",
                has_touch=size != "desktop",
                locale=locale,
                java_script_enabled=False,
            )
            page = await context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            response = await page.goto(f"{base}/console/")
            assert response is not None and response.status == 200
            assert page.url.startswith(f"{base}/console/login?next=")
            assert await page.locator("html").get_attribute("lang") == locale[:2]
            heading = "An der Konsole anmelden" if german else "Sign in to the console"
            assert await page.get_by_role("heading", name=heading).is_visible()
            colour = await page.locator(".bar").evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == "rgb(138, 21, 56)", "the stylesheets load under the CSP"
            await fits(page, viewport["width"])
            # the skip link is the first stop of the keyboard, and visible when focused
            await page.keyboard.press("Tab")
            focused = page.locator(":focus")
            assert await focused.get_attribute("class") == "skip-link"
            assert await focused.is_visible()
            shot = tmp_path / f"console-login-{size}.png"
            await page.screenshot(path=str(shot), full_page=True)
            keep(shot)

            # a wrong password: the page says so, the fields keep their labels
            await page.get_by_label("E-Mail-Adresse" if german else "Email address").fill(AGENT)
            await page.get_by_label("Passwort" if german else "Password").fill("wrong password!")
            await page.get_by_role("button", name="Anmelden" if german else "Sign in").click()
            assert await page.get_by_role("alert").is_visible()
            assert problems == [
                "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
            ]
            problems.clear()
            shot = tmp_path / f"console-login-wrong-{size}.png"
            await page.screenshot(path=str(shot), full_page=True)
            keep(shot)

            await page.get_by_label("E-Mail-Adresse" if german else "Email address").fill(AGENT)
            await page.get_by_label("Passwort" if german else "Password").fill(PASSWORD)
            await page.get_by_role("button", name="Anmelden" if german else "Sign in").click()
            assert page.url == f"{base}/console/"
            assert await page.get_by_text(AGENT).first.is_visible()
            assert await page.get_by_text(
                "Makler/in" if german else "Agent", exact=True
            ).is_visible()
            cookies = {c["name"]: c for c in await context.cookies()}
            session = cookies["sealrelay_session"]
            assert session["httpOnly"] and session["sameSite"] == "Lax"
            assert session["path"] == "/" and session["expires"] == -1
            await fits(page, viewport["width"])
            shot = tmp_path / f"console-home-{size}.png"
            await page.screenshot(path=str(shot), full_page=True)
            keep(shot)

            # another browser of the same user is signed out by "everywhere"
            other = await browser.new_context(locale=locale, java_script_enabled=False)
            other_page = await other.new_page()
            await other_page.goto(f"{base}/console/login")
            await other_page.locator("#email").fill(AGENT)
            await other_page.locator("#password").fill(PASSWORD)
            await other_page.locator("button[type=submit]").click()
            assert other_page.url == f"{base}/console/"
            await page.reload()
            assert await page.get_by_text("2 Sitzungen" if german else "2 sessions").is_visible()
            everywhere = "Auf allen Geräten abmelden" if german else "Sign out on all devices"
            await page.get_by_role("button", name=everywhere).click()
            assert page.url == f"{base}/console/login?done=everywhere"
            assert await page.get_by_role("status").is_visible()
            await other_page.goto(f"{base}/console/")
            assert other_page.url.startswith(f"{base}/console/login")
            await other.close()
            assert problems == []
        finally:
            await browser.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_an_admin_with_totp_types_the_code_on_a_phone(
    relay_factory: StartRelay, tmp_path: Path
) -> None:
    async_playwright = playwright_api()
    base, relay = await started(relay_factory)
    await users.add_user(relay.relay.db, "boss@broker.example", PASSWORD, role=Role.ADMIN)
    setup = await totp.enable(relay.relay.db, "boss@broker.example")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport=PHONE,
                device_scale_factor=2,
                is_mobile=True,
                locale="en-GB",
                java_script_enabled=False,
            )
            page = await context.new_page()
            await page.goto(f"{base}/console/login")
            await page.locator("#email").fill("boss@broker.example")
            await page.locator("#password").fill(PASSWORD)
            await page.locator("button[type=submit]").click()
            assert await page.get_by_label("Code").is_visible()
            await fits(page, PHONE["width"])
            shot = tmp_path / "console-code-phone.png"
            await page.screenshot(path=str(shot), full_page=True)
            keep(shot)
            await page.get_by_label("Code").fill(pyotp.TOTP(setup.secret).now())
            await page.get_by_role("button", name="Confirm").click()
            assert page.url == f"{base}/console/"
            assert await page.get_by_text("Administrator").is_visible()
        finally:
            await browser.close()
