"""The prospect's whole registered-letter journey in a real headless Chromium on a phone.

Open the letter link from the mail, read, press the button without ticking (the server
answers 422 and says what is missing), tick the declarations, press the button, land on the
offer and download an attachment. In German and in Spanish (the agent's
`X-Sealrelay-Language: es`). Screenshots of both pages per language go to the test's
tmp_path; the letter pages are also copied to /tmp/letter-{de,es}.png to be looked at.

Uses Debian's /usr/bin/chromium through Playwright, like test_browser_downloads: without
either the test fails with what to install; it never skips.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.store.models import Consent
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT
from tests.letter_fixtures import StartSite
from tests.letter_site import (
    BUTTON_DE,
    BUTTON_ES,
    FLOOR_PLAN,
    PROSPECT,
    Clock,
    offer,
)
from tests.support import Sink

JOURNEY = {
    "de": {
        "locale": "de-DE",
        "button": BUTTON_DE,
        "heading": "Ihre Erklärungen",
        "title": "Widerrufsbelehrung",
        "missing": "Es fehlen noch Erklärungen",
        "missing_one": "Bitte kreuzen Sie diese Erklärung an.",
        "declarations": (
            "Ich habe die Widerrufsbelehrung",
            "Ich verlange ausdrücklich",
            "Ich beauftrage den Makler",
        ),
        "offer": "Ihr Exposé",
        "attachments": "Anhänge",
        "open_offer": "Exposé ansehen",
    },
    "es": {
        "locale": "es-ES",
        "button": BUTTON_ES,
        "heading": "Sus declaraciones",
        "title": "Revocación: información sobre el derecho de desistimiento",
        "missing": "Aún faltan declaraciones",
        "missing_one": "Marque esta declaración.",
        "declarations": (
            "He recibido en el correo",
            "Solicito expresamente",
            "Encargo al agente",
        ),
        "offer": "Su exposé",
        "attachments": "Archivos adjuntos",
        "open_offer": "Ver el exposé",
    },
}


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("language", ["de", "es"])
async def test_phone_journey_from_letter_to_offer(
    site_factory: StartSite,
    language: str,
    sink: Sink,
    tmp_path: Path,
) -> None:
    async_playwright = playwright_api()
    texts = JOURNEY[language]
    site = await site_factory()
    token, _ = await site.send_offer(offer(language=language if language != "de" else None))
    letter_url = f"{site.url}/l/{token}"

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
                locale=texts["locale"],
                java_script_enabled=False,
                accept_downloads=True,
            )
            page = await context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            # 1. the letter: texts, boxes and the exact button
            response = await page.goto(letter_url)
            assert response is not None and response.status == 200
            assert await page.locator("html").get_attribute("lang") == language
            assert await page.get_by_role("heading", name="Villa am See").is_visible()
            assert await page.get_by_role("heading", name=texts["title"]).first.is_visible()
            button = page.get_by_role("button", name=texts["button"], exact=True)
            assert await button.count() == 1
            assert (await button.inner_text()).strip() == texts["button"]
            boxes = page.get_by_role("checkbox")
            assert await boxes.count() == 3
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], "nothing wider than the phone"
            colour = await page.locator(".brand").evaluate(
                "e => getComputedStyle(e).backgroundColor"
            )
            assert colour == "rgb(138, 21, 56)", "the stylesheets load under the CSP"
            shot = tmp_path / f"letter-{language}.png"
            await page.screenshot(path=str(shot), full_page=True)
            shutil.copy(shot, f"/tmp/letter-{language}.png")
            # the consent part at the end, as the phone shows it
            await page.locator("#consent").scroll_into_view_if_needed()
            await page.screenshot(path=str(tmp_path / f"consent-{language}.png"))
            shutil.copy(tmp_path / f"consent-{language}.png", f"/tmp/consent-{language}.png")

            # 2. the button without ticking: the server says what is missing
            async with page.expect_navigation() as navigation:
                await button.click()
            answer = await navigation.value
            assert answer is not None and answer.status == 422
            alert = page.get_by_role("alert")
            assert await alert.is_visible()
            assert texts["missing"] in await alert.inner_text()
            assert await page.get_by_text(texts["missing_one"]).count() == 3
            shutil.copy(
                await _shot(page, tmp_path / f"missing-{language}.png"),
                f"/tmp/letter-missing-{language}.png",
            )

            # 3. tick each declaration by its text (the whole label is the target)
            for start in texts["declarations"]:
                label = page.locator("label.check-label", has_text=start)
                box = await label.bounding_box()
                assert box is not None and box["height"] >= 44
                await label.locator(".check-declaration").click()
                assert await label.get_by_role("checkbox").is_checked()
            button = page.get_by_role("button", name=texts["button"], exact=True)
            box = await button.bounding_box()
            assert box is not None and box["height"] >= 44
            async with page.expect_navigation() as navigation:
                await button.click()
            answer = await navigation.value
            assert answer is not None and answer.status == 200
            assert page.url == f"{letter_url}/offer"

            # 4. the offer: subject, body, attachments
            assert await page.get_by_text(texts["offer"]).first.is_visible()
            assert await page.get_by_text("hier ist das").is_visible()
            assert await page.get_by_role("heading", name=texts["attachments"]).is_visible()
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"]
            shot = tmp_path / f"offer-{language}.png"
            await page.screenshot(path=str(shot), full_page=True)
            shutil.copy(shot, f"/tmp/offer-{language}.png")

            async with page.expect_download() as waiting:
                await page.get_by_role("link", name="Grundriss Erdgeschoss.pdf").click()
            download = await waiting.value
            assert download.suggested_filename == "Grundriss Erdgeschoss.pdf"
            saved = tmp_path / "saved.pdf"
            await download.save_as(saved)
            assert hashlib.sha256(saved.read_bytes()).digest() == (
                hashlib.sha256(FLOOR_PLAN).digest()
            )
            # 5. the letter link again: a short page pointing to the offer and the PDF
            response = await page.goto(letter_url)
            assert response is not None and response.status == 200
            assert await page.get_by_role("link", name=texts["open_offer"]).is_visible()
            shutil.copy(
                await _shot(page, tmp_path / f"released-{language}.png"),
                f"/tmp/letter-released-{language}.png",
            )
            # the one expected error: the 422 the server answered on purpose
            assert [p for p in problems if "422" not in p] == [], problems
            await context.close()
        finally:
            await browser.close()

    assert await site.count(Consent) == 1
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    assert consent.ip == "127.0.0.1" and "Chrome" in consent.user_agent
    arrived = await site.sink.expect(3)
    assert len(arrived) == 3


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_phone_asks_the_agent_for_a_new_link(
    site_factory: StartSite,
    sink: Sink,
    tmp_path: Path,
    clock: Clock,
) -> None:
    async_playwright = playwright_api()
    site = await site_factory()
    token, _ = await site.send_offer()
    clock.advance(days=15)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport=PHONE,
                device_scale_factor=2,
                is_mobile=True,
                locale="de-DE",
                java_script_enabled=False,
            )
            page = await context.new_page()
            response = await page.goto(f"{site.url}/l/{token}")
            assert response is not None and response.status == 410
            assert await page.get_by_text("Dieser Link ist abgelaufen").is_visible()
            shutil.copy(await _shot(page, tmp_path / "expired.png"), "/tmp/letter-expired-de.png")
            async with page.expect_navigation() as navigation:
                await page.get_by_role(
                    "button", name="Anna Agent um einen neuen Link bitten"
                ).click()
            answer = await navigation.value
            assert answer is not None and answer.status == 200
            assert await page.get_by_text("Wir haben Anna Agent gebeten").is_visible()
            shutil.copy(await _shot(page, tmp_path / "renewed.png"), "/tmp/letter-renewed-de.png")
            await context.close()
        finally:
            await browser.close()
    arrived = await site.sink.expect(2)
    assert [m.rcpt_tos for m in arrived] == [[PROSPECT], [AGENT]]


async def _shot(page: object, path: Path) -> Path:
    await page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path
