"""The console's work pages in Chromium, without JavaScript, on a phone (German) and a desktop
(English): an agent follows a download and a consent (the link scanner shown apart), ends a
recipient's access, re-sends a letter and previews one without a trace; an admin adds a user
who then sends mail; an auditor sees everything and is offered no change.

Screenshots go to the test's tmp dir and to /work/wt/screens/console-pages/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.store.models import Message
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import PASSWORD
from tests.console.browser_sign_in import sign_in
from tests.console.work_world import ADMIN, AGENT, AUDITOR, BUYER, World, build_world
from tests.letter_site import LetterSite, offer
from tests.links.test_link_actions import SAFE_LINKS
from tests.queue_wait import queue_idle

DESKTOP = {"width": 1280, "height": 800}
SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/console-pages"))
FILE_PATH = re.compile(r'href="(/d/[A-Za-z0-9_-]{43}/f/[0-9a-f]+)"')
SIZES = [("phone", PHONE, "de-DE"), ("desktop", DESKTOP, "en-GB")]


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


class Screens:
    def __init__(self, tmp_path: Path, size: str) -> None:
        self.tmp_path = tmp_path
        self.size = size

    async def take(self, page: Any, name: str, width: int) -> None:
        scroll = await page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width, f"{name}: the page is {scroll} px wide on a {width} px screen"
        shot = self.tmp_path / f"console-{name}-{self.size}.png"
        await page.screenshot(path=str(shot), full_page=True)
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENS / shot.name)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_agent_follows_acts_and_previews(
    world: World, tmp_path: Path, size: str, viewport: dict[str, int], locale: str
) -> None:
    async_playwright = playwright_api()
    german = locale.startswith("de")
    site = world.site
    base = world.url
    shots = Screens(tmp_path, size)
    # the prospect's side: a scanner first (HEAD and Safe Links), then a person downloads
    await site.request("HEAD", f"/d/{world.link_token}")
    await site.request("GET", f"/d/{world.link_token}", headers={"User-Agent": SAFE_LINKS})
    _, body = await site.get(f"/d/{world.link_token}")
    [file_path] = set(FILE_PATH.findall(body.decode()))
    await site.get(file_path)
    assert (await site.consent(world.letter_token)).status == 303
    await queue_idle(site.relay.db)  # the released copy and the agent's confirmation
    second_token, _ = await site.send_offer(recipient="second@example.com")
    async with site.harness.client(username=AGENT, password=PASSWORD) as client:
        await client.sendmail("", [BUYER], offer(subject="Gelesen: Villa am See", big=False))
    async with site.relay.db.transaction() as session:
        receipt = await session.scalar(
            select(Message.id).where(Message.subject == "Gelesen: Villa am See")
        )

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await sign_in(browser, base, AGENT, viewport, locale)
            await page.get_by_role(
                "link", name="Ihre Nachrichten" if german else "Your messages"
            ).click()
            assert page.url == f"{base}/console/messages"
            assert await page.get_by_role("link", name="Unterlagen Villa am See").is_visible()
            await page.locator("#state").select_option("letter_waiting")
            await page.get_by_role("button", name="Anzeigen" if german else "Show").click()
            assert "state=letter_waiting" in page.url
            assert await page.get_by_text("second@example.com").is_visible()
            await page.goto(f"{base}/console/messages")
            await shots.take(page, "timeline", viewport["width"])

            await page.goto(f"{base}/console/messages/{receipt}")  # a read receipt, MAIL FROM:<>
            sender = page.locator("dd").filter(has_text="<>")
            assert await sender.inner_text() == "<>"
            await shots.take(page, "message-null-sender", viewport["width"])

            answer = await page.goto(f"{base}/console/no-such-page")
            assert answer is not None and answer.status == 404
            heading = "Seite nicht gefunden" if german else "Page not found"
            assert await page.get_by_role("heading", name=heading).is_visible()
            menu = page.get_by_role("navigation").get_by_role("link")
            assert await menu.filter(has_text="Nachrichten" if german else "Messages").is_visible()
            await shots.take(page, "no-such-page", viewport["width"])
            await page.goto(f"{base}/console/messages")

            await page.get_by_role("link", name="Unterlagen Villa am See").click()
            scanner = page.locator(".scanner")
            assert await scanner.is_visible()
            heading = "Automatische Aufrufe" if german else "Automated visits"
            assert heading in await scanner.inner_text()
            people = page.locator(".recipient .events").first
            first = "Erster Download" if german else "First download"
            assert first in await people.inner_text()
            assert first not in await scanner.inner_text()
            assert "Exposé Villa am See.pdf" in await people.inner_text()
            await shots.take(page, "message-download", viewport["width"])

            # ending access: the recipient's page then says so
            await page.locator("input[name=reason]").first.fill("Objekt verkauft")
            await page.locator("form[action$='/revoke'] button").click()
            assert page.url.endswith("?done=revoked")
            assert await page.get_by_role("status").first.is_visible()
            await shots.take(page, "message-revoked", viewport["width"])
            prospect = await browser.new_page(viewport=viewport, locale=locale)
            await prospect.goto(f"{base}/d/{world.link_token}")
            text = await prospect.locator("main").inner_text()
            assert "Zugang beendet" in text or "Access ended" in text
            await shots.take(prospect, "prospect-access-ended", viewport["width"])
            await prospect.close()

            # the consented letter: evidence and the consent PDF
            await page.goto(f"{base}/console/messages/{world.letter_message}")
            consent = "Zustimmung erteilt" if german else "Consent given"
            assert await page.get_by_text(consent, exact=True).is_visible()
            async with page.expect_download() as download_info:
                await page.get_by_role(
                    "link", name="Zustimmungsnachweis (PDF)" if german else "Consent record (PDF)"
                ).first.click()
            download = await download_info.value
            assert download.suggested_filename.endswith(".pdf")
            await shots.take(page, "message-consent", viewport["width"])

            # letters waiting, then a preview that leaves no trace, then a re-send
            await page.goto(f"{base}/console/letters")
            assert await page.get_by_text("second@example.com").is_visible()
            await shots.take(page, "letters", viewport["width"])
            await page.get_by_role("link", name="Villa am See").click()
            before = await world.journal_size()
            await page.get_by_role(
                "link",
                name="Vorschau des Briefs (zeichnet nichts auf)"
                if german
                else "Preview the letter (records nothing)",
            ).click()
            assert await page.locator("main form").count() == 0
            assert await page.locator("input[type=checkbox]:not([disabled])").count() == 0
            await shots.take(page, "preview", viewport["width"])
            assert await world.journal_size() == before, "the preview recorded something"
            await page.go_back()
            sent = len(site.sink.messages)
            await page.locator("form[action$='/resend'] button").click()
            assert page.url.endswith("?done=resent")
            await site.sink.expect(sent + 1)
            response, _ = await site.get(f"/l/{second_token}")
            assert response.status == 410, "the old letter link ended"
            await shots.take(page, "message-resent", viewport["width"])
            if size == "phone":  # the smallest phones in use: nothing cut off at 360 px
                await page.set_viewport_size({"width": 360, "height": 740})
                for path in (
                    f"/console/messages/{world.link_message}",
                    "/console/messages",
                    "/console/letters",
                ):
                    await page.goto(base + path)
                    scroll = await page.evaluate("document.documentElement.scrollWidth")
                    assert scroll <= 360, f"{path} is {scroll} px wide on a 360 px screen"
                # keyboard: the skip link first, sign-out in the bar, then the navigation
                await page.keyboard.press("Tab")
                assert await page.locator(":focus").get_attribute("class") == "skip-link"
                await page.keyboard.press("Tab")
                assert await page.locator(":focus").inner_text() == "Abmelden"
                await page.keyboard.press("Tab")
                assert await page.locator(":focus").inner_text() == "Start"
        finally:
            await browser.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_admin_adds_a_user_and_the_auditor_changes_nothing(
    world: World, tmp_path: Path, size: str, viewport: dict[str, int], locale: str
) -> None:
    async_playwright = playwright_api()
    german = locale.startswith("de")
    site = world.site
    base = world.url
    shots = Screens(tmp_path, size)
    newcomer = f"neu-{size}@broker.example"
    site.sink.refuse["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
    await site.harness.send(offer(subject="Ins Leere", big=False), recipients=["gone@example.com"])
    await queue_idle(site.relay.db)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await sign_in(browser, base, ADMIN, viewport, locale)
            await page.get_by_role(
                "link", name="Verwaltung" if german else "Administration"
            ).first.click()
            await shots.take(page, "admin", viewport["width"])
            await page.goto(f"{base}/console/admin/users")
            await page.locator("#new-email").fill(newcomer)
            await page.locator("#new-role").select_option("agent")
            await page.locator("#new-group").fill("nord")
            await page.locator("#new-aliases").fill(f"team-{size}@broker.example")
            await page.locator("form[action='/console/admin/users'] button").click()
            password = (await page.locator(".secret-value").inner_text()).strip()
            assert len(password) >= 10
            await shots.take(page, "admin-user-added", viewport["width"])
            sent = len(site.sink.messages)
            async with site.harness.client(username=newcomer, password=password) as client:
                await client.sendmail(
                    newcomer,
                    [BUYER],
                    f"From: {newcomer}\r\nTo: {BUYER}\r\nSubject: Hallo\r\n\r\nTest\r\n".encode(),
                )
            await site.sink.expect(sent + 1)
            await page.goto(f"{base}/console/admin/queue")
            assert "no such user" in await page.locator("main").inner_text()
            await shots.take(page, "admin-queue", viewport["width"])
            await page.goto(f"{base}/console/admin/journal")
            await shots.take(page, "admin-journal", viewport["width"])
            await page.goto(f"{base}/console/admin/webhooks")
            await page.locator("#url").fill("http://127.0.0.1:9/hook")
            await page.locator("#description").fill("CRM")
            await page.locator("#allow_private").check()
            await page.locator("form[action='/console/admin/webhooks'] button").click()
            assert "whsec_" in await page.locator(".secret-value").inner_text()
            await shots.take(page, "admin-webhooks", viewport["width"])
            await page.goto(f"{base}/console/admin/keys")
            await page.locator("#key-name").fill("CRM")
            await page.locator("form[action='/console/admin/keys'] button").click()
            await shots.take(page, "admin-keys", viewport["width"])

            auditor = await sign_in(browser, base, AUDITOR, viewport, locale)
            before = await world.journal_size()
            for path, name in (
                ("/console/messages", None),
                (f"/console/messages/{world.link_message}", "auditor-message"),
                ("/console/admin/users", "auditor-users"),
                ("/console/admin/webhooks", None),
                ("/console/admin/keys", None),
                ("/console/admin/queue", None),
            ):
                response = await auditor.goto(base + path)
                assert response is not None and response.status == 200
                forms = auditor.locator("main form[method=post]")
                assert await forms.count() == 0, path
                if name:
                    await shots.take(auditor, name, viewport["width"])
            await auditor.goto(f"{base}/console/admin/users")
            assert newcomer in await auditor.locator("main").inner_text()
            assert await world.journal_size() == before
        finally:
            await browser.close()
