"""The admins' settings pages in Chromium, without JavaScript: the effective policy, the
consent texts (one subject carrying markup) and the DKIM records, one published, one with
another key in DNS, one missing, on a phone (German, Spanish) and a desktop (English).
Nothing may be wider than the screen, however long a key.

Screenshots go to the test's tmp dir and to /work/wt/screens/admin-config/ (or
SEALRELAY_SCREENS), to be looked at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway import users
from gateway.console.dkim_records import DkimRecord
from gateway.mail import dkim
from gateway.store.models import Role
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import DKIM_DOMAIN, DKIM_SELECTOR, PASSWORD, StartRelay
from tests.console.browser_sign_in import sign_in
from tests.console.test_admin_config import ADMIN, EVIL, POLICY_SECTIONS, RECORD
from tests.dns_server import tiny_dns
from tests.support import free_port

DESKTOP = {"width": 1280, "height": 800}
SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/admin-config"))
SIZES = [
    ("phone-de", PHONE, "de-DE"),
    ("desktop-en", DESKTOP, "en-GB"),
    ("phone-es", PHONE, "es-ES"),
]
HEADINGS = {
    "de": ("Wirksame Richtlinie", "Einwilligungstexte", "DKIM-Einträge"),
    "en": ("Effective policy", "Consent texts", "DKIM records"),
    "es": ("Política vigente", "Textos de consentimiento", "Registros DKIM"),
}
STATES = {
    "de": ("Veröffentlicht", "Abweichend", "Fehlt"),
    "en": ("Published", "Different", "Missing"),
    "es": ("Publicado", "Distinto", "Falta"),
}


async def take(page: Any, tmp_path: Path, name: str, width: int) -> None:
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"{name}: the page is {scroll} px wide on a {width} px screen"
    shot = tmp_path / f"{name}.png"
    await page.screenshot(path=str(shot), full_page=True)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENS / shot.name)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("size", "viewport", "locale"), SIZES)
async def test_admin_settings_pages_on_phone_and_desktop(
    relay_factory: StartRelay,
    tmp_path: Path,
    dkim_key: dkim.DkimKey,
    size: str,
    viewport: dict[str, int],
    locale: str,
) -> None:
    language = locale[:2]
    evil = tmp_path / "evil-set"
    shutil.copytree(Path(__file__).parents[2] / "gateway/texts/letters/default", evil)
    blocks = evil / "en" / "blocks.toml"
    blocks.write_text(
        blocks.read_text(encoding="utf-8").replace(
            'letter_subject = "', f'letter_subject = "{EVIL} ', 1
        ),
        encoding="utf-8",
    )
    other_key = tmp_path / "other.pem"
    dkim.write_private_key(dkim.generate_private_key(), other_key)
    ours = DkimRecord(DKIM_DOMAIN, DKIM_SELECTOR, RECORD, dkim.public_txt_value(dkim_key), None)
    zone = {
        RECORD: [ours.strings],
        # other.example's DNS still shows our broker key: not the one configured for it
        "mail._domainkey.other.example": [ours.strings],
    }
    async with tiny_dns(zone) as (_, port):
        sections = dict(POLICY_SECTIONS)
        sections["groups"] = [
            *POLICY_SECTIONS["groups"],
            {"name": "evil", "letter_block_set": "evil"},
        ]
        web_port = free_port()
        relay = await relay_factory(
            server={"public_url": f"http://127.0.0.1:{web_port}"},
            web={"listen": f"127.0.0.1:{web_port}"},
            console={"dns_checks": True, "dns_resolver": f"127.0.0.1:{port}"},
            letter={"block_sets": {"evil": str(evil)}},
            dkim={
                "other.example": {"selector": "mail", "key_file": str(other_key)},
                "third.example": {"selector": "s1", "key_file": str(other_key)},
            },
            **sections,
        )
        await users.add_user(relay.relay.db, ADMIN, PASSWORD, role=Role.ADMIN)
        base = relay.web_url
        async_playwright = playwright_api()
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = await sign_in(browser, base, ADMIN, viewport, locale)
                await page.goto(f"{base}/console/admin")
                policy_title, texts_title, dkim_title = HEADINGS[language]

                await page.get_by_role("link", name=policy_title).click()
                assert page.url == f"{base}/console/admin/policy"
                assert await page.get_by_role("heading", name=policy_title).is_visible()
                await take(page, tmp_path, f"admin-policy-{size}", viewport["width"])

                await page.goto(f"{base}/console/admin")
                await page.get_by_role("link", name=texts_title).click()
                assert page.url == f"{base}/console/admin/texts"
                await page.locator("details summary").first.click()  # the default set's letter
                evil_letter = page.locator("section", has_text="evil · EN").locator("details").first
                await evil_letter.locator("summary").click()
                assert await evil_letter.get_by_text(EVIL).first.is_visible()
                await take(page, tmp_path, f"admin-texts-{size}", viewport["width"])

                await page.goto(f"{base}/console/admin")
                await page.get_by_role("link", name=dkim_title).click()
                assert page.url == f"{base}/console/admin/dkim"
                found, different, missing = STATES[language]
                states = await page.locator(".dns").all_inner_texts()
                assert [s.split(":")[0] for s in states] == [found, different, missing]
                for summary in await page.locator("details summary").all():
                    await summary.click()
                await take(page, tmp_path, f"admin-dkim-{size}", viewport["width"])
            finally:
                await browser.close()
