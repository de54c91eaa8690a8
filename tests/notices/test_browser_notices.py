"""The agent's notices as a reader sees them: each text part in headless Chromium on a phone
and a desktop, in German, English and Spanish, with the checks every mail of the relay gets
(tests/mail/test_browser_mails.py: no markup, no placeholders, one language, not too wide).

The mails are composed as the notice desk composes them (its content through a real relay is
tests/notices/test_first_download.py's and test_expiry_warning.py's) and rendered by the one
builder of the relay's own mail. Screenshots: var/screenshots/notices/.
"""

from __future__ import annotations

import html
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mail import own_mail
from gateway.notices.mails import (
    FirstDownloads,
    WaitingLetter,
    expiry_warning_mail,
    first_download_mail,
)
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT
from tests.mail.test_browser_mails import (
    DESKTOP,
    LOCALES,
    PLAIN_PAGE,
    defects,
    languages_of,
    readable_parts,
)
from tests.support import screenshot_dir

AT = datetime(2026, 12, 2, 14, 3, 9, tzinfo=UTC)
PUBLIC = "https://relay.broker.example"
SUBJECTS = {"de": "Unterlagen Seestraße 4", "en": "Documents 4 Lake Road", "es": "Documentos"}
FILES = ("Grundriss Erdgeschoss.pdf", "Fotos Garten & Terrasse (2).zip", "Energieausweis.pdf")


def mails(language: str) -> list[tuple[str, bytes]]:
    first = first_download_mail(
        FirstDownloads("0f3a9c2e7b1d4a6f8e0c2b4d6f8a0c2e", "paula@example.com",
                       SUBJECTS[language], FILES, AT),
        agent_address=AGENT, public_url=PUBLIC, language=language, zone="Europe/Berlin",
    )  # fmt: skip
    warning = expiry_warning_mail(
        WaitingLetter("7c1e5a9b3d2f4e6a8c0b1d3f5a7c9e1b", "0f3a9c2e7b1d4a6f8e0c2b4d6f8a0c2e",
                      "paula@example.com", SUBJECTS[language], AT - timedelta(days=12),
                      AT + timedelta(days=2)),
        agent_address=AGENT, public_url=PUBLIC, language=language, zone="Europe/Berlin",
    )  # fmt: skip
    return [
        (name, own_mail.render(mail, sender="postmaster@broker.example",
                               hostname="relay.broker.example", now=AT))
        for name, mail in (("first-download", first), ("expiry-warning", warning))
    ]  # fmt: skip


@pytest.mark.parametrize("language", ["de", "en", "es"])
async def test_the_notices_read_clean_on_a_phone_and_a_desktop(
    language: str, tmp_path: Path
) -> None:
    async_playwright = playwright_api()
    parts = [part for name, raw in mails(language) for part in readable_parts(name, raw)]
    assert [(p.mail, p.content_type) for p in parts] == [
        ("first-download", "text/plain"),
        ("expiry-warning", "text/plain"),
    ]
    problems = [f"{p.mail} subject: {d}" for p in parts for d in defects(p.subject)]
    shots = screenshot_dir("notices")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for viewport_name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                context = await browser.new_context(
                    viewport=viewport,
                    device_scale_factor=2 if viewport_name == "phone" else 1,
                    is_mobile=viewport_name == "phone",
                    locale=LOCALES[language],
                )
                await context.route("**/*", lambda route: route.abort())
                page = await context.new_page()
                for part in parts:
                    text = html.escape(f"Subject: {part.subject}\n\n{part.content}")
                    await page.set_content(PLAIN_PAGE.format(lang=language, text=text))
                    seen = await page.evaluate("document.body.innerText")
                    where = f"{part.mail} on a {viewport_name}"
                    problems += [f"{where}: {d}" for d in defects(seen)]
                    # the short first-download mail has too few words to judge; none foreign
                    if languages_of(seen) - {language}:
                        problems.append(f"{where}: written in {sorted(languages_of(seen))}")
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    if width > viewport["width"]:
                        problems.append(f"{where}: {width} px wide, wider than the screen")
                    for name in FILES[:2] if part.mail == "first-download" else ():
                        assert name in seen  # the file names as the prospect's files carry them
                    shot = tmp_path / f"{language}-{part.mail}-{viewport_name}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    shutil.copy(shot, shots / shot.name)
                await context.close()
        finally:
            await browser.close()
    assert not problems, "\n".join(problems)
