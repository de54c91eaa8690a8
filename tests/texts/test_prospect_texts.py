"""Small text defects a prospect meets first (issue 14, item 8), through the real relay.

- a commission that ends in a period ("inkl. MwSt.") is not followed by a second one;
- a letter to a recipient without a name greets properly in each language, not "Dear,";
- the agent is named alike on download and letter pages: name and address where the page
  introduces them, the name where it asks the prospect to contact them;
- the offer page lists the main exposé PDF (linked because it is large) among its
  attachments, downloadable from there;
- the logo's alt text fits in the header when the logo cannot be loaded (Chromium, phone).

SQLite and PostgreSQL for everything that touches the database; the browser test once.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import html
import io
import re
from typing import Any

import pypdf
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT
from tests.letter_fixtures import StartSite
from tests.letter_site import (
    BIG_PDF,
    PROSPECT,
    LetterSite,
    offer,
    text_of,
)
from tests.support import Sink, screenshot_dir

COMMISSION = "3,57 % des Kaufpreises inkl. MwSt."
GREETINGS = {
    "de": ("Sehr geehrte Damen und Herren,", "Guten Tag Paula Prospect,"),
    "en": ("Dear Sir or Madam,", "Dear Paula Prospect,"),
    "es": ("Estimado/a cliente:", "Estimado/a Paula Prospect:"),
}
BARE_GREETINGS = ("Dear,", "Guten Tag,", "Estimado/a:", "Dear ,", "Guten Tag ,")


def parts_of(raw: bytes) -> tuple[str, str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    text, markup = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert text is not None and markup is not None
    return str(text.get_content()), str(markup.get_content())


def words(markup: str) -> str:
    """What a reader sees of HTML (escaped once or twice): tags gone, nothing put between."""
    once = html.unescape(markup)
    return " ".join(re.sub(r"<[^>]+>", "", html.unescape(once)).split())


def pdf_text(pdf: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return " ".join(" ".join(page.extract_text().split()) for page in reader.pages)


def without_name(raw: bytes) -> bytes:
    named = f"To: Paula Prospect <{PROSPECT}>".encode()
    assert named in raw
    return raw.replace(named, f"To: {PROSPECT}".encode())


@pytest.fixture
async def site(site_factory: StartSite) -> LetterSite:
    return await site_factory(letter={"commission": COMMISSION})


async def test_a_commission_ending_in_a_period_gets_no_second_one(site: LetterSite) -> None:
    token, letter = await site.send_offer()
    text, markup = parts_of(letter.data)
    for shown in (text.replace("*", ""), words(markup)):
        assert "inkl. MwSt." in shown
        assert "MwSt.." not in shown
    _, page = await site.get(f"/l/{token}")
    seen = " ".join(re.sub(r"<[^>]+>", "", page.decode()).split())
    assert "inkl. MwSt." in seen and "MwSt.." not in seen
    assert (await site.consent(token)).status == 303
    _, pdf = await site.get(f"/l/{token}/consent.pdf")
    assert "inkl. MwSt." in pdf_text(pdf) and "MwSt.." not in pdf_text(pdf)


@pytest.mark.parametrize("language", ["de", "en", "es"])
async def test_a_letter_greets_properly_with_and_without_a_name(
    site: LetterSite, language: str
) -> None:
    anonymous, named = GREETINGS[language]
    _, letter = await site.send_offer(without_name(offer(language=language)))
    text, markup = parts_of(letter.data)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == anonymous, lines[:3]
    assert not set(lines) & set(BARE_GREETINGS)
    assert anonymous in words(markup)

    _, letter = await site.send_offer(offer(language=language), recipient=PROSPECT)
    text, _ = parts_of(letter.data)
    assert text.lstrip().startswith(named), text[:80]


async def test_the_agent_is_named_alike_on_download_and_letter_pages(site: LetterSite) -> None:
    label = f"Anna Agent ({AGENT})"
    # a plain mail with a large attachment: the prospect gets a download link
    raw = offer(subject="Unterlagen Villa am See")
    await site.harness.send(raw, recipients=["dora@example.org"])
    [copy] = await site.sink.expect(1)
    text, _ = parts_of(copy.data)
    [download] = re.findall(rf"{re.escape(site.url)}(/d/[A-Za-z0-9_-]+)", text)
    _, page = await site.get(download)
    assert f"{label} hat Ihnen Dateien bereitgestellt" in text_of(page).replace("&amp;", "&")

    token, _ = await site.send_offer()
    _, page = await site.get(f"/l/{token}")
    assert label in text_of(page)

    # expired: ask the agent, by name, with their address behind the mail button
    site.clock.advance(days=91)
    response, page = await site.get(download)
    assert response.status == 410
    shown = text_of(page)
    assert "bitte fragen Sie Anna Agent nach einem neuen" in shown
    assert "E-Mail an Anna Agent schreiben" in shown
    assert f'href="mailto:{AGENT}?subject=' in page.decode()
    response, page = await site.get(f"/l/{token}")
    assert response.status == 410
    assert "Anna Agent" in text_of(page) and AGENT not in text_of(page)


async def test_the_offer_page_lists_the_linked_expose_among_its_attachments(
    site: LetterSite,
) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    _, page = await site.get(f"/l/{token}/offer")
    markup = page.decode()
    files = markup.split('files-card"', 1)[1].split("</section>", 1)[0]
    names = re.findall(r'<span class="file-name">([^<]+)</span>', files)
    assert sorted(html.unescape(n) for n in names) == [
        "Exposé Villa am See.pdf",
        "Grundriss Erdgeschoss.pdf",
    ]
    assert "2 Dateien" in files
    [url] = re.findall(
        r'href="([^"]+)">\s*<span class="file-badge"[^>]*>PDF</span>\s*<span class="file-text">'
        r'\s*<span class="file-name">Exposé Villa am See.pdf',
        files,
    )
    response, data = await site.get(html.unescape(url))
    assert response.status == 200
    assert hashlib.sha256(data).digest() == hashlib.sha256(BIG_PDF).digest()
    assert "Exposé Villa am See.pdf" in response.headers["Content-Disposition"].replace(
        "Expos%C3%A9%20Villa%20am%20See.pdf", "Exposé Villa am See.pdf"
    )
    [first] = await site.events("download.first")
    assert first.data["filename"] == "Exposé Villa am See.pdf"
    assert first.data["recipient"] == PROSPECT


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_phone_pages_read_whole(
    site_factory: StartSite,
    sink: Sink,
) -> None:
    """English pages on a phone whose logo cannot load: the name in its place is whole, the
    times carry their zone, the commission one period; screenshots to look at."""
    async_playwright = playwright_api()
    shots = screenshot_dir("pages")
    site = await site_factory(
        letter={"commission": COMMISSION},
        # our own origin (the CSP allows it) answers 404: the browser shows the alt text
        branding={
            "company_name": "Müller & Söhne Immobilien GmbH & Co. KG",
            "logo_url": "/static/no-logo.png",
        },
    )
    token, _ = await site.send_offer(without_name(offer(language="en")))
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
            await page.goto(f"{site.url}/l/{token}")
            await assert_logo_name_fits(page)
            body = await page.locator("main").inner_text()
            assert "inkl. MwSt." in body and "MwSt.." not in body
            await page.screenshot(path=str(shots / "letter-en.png"), full_page=True)
            for box in await page.get_by_role("checkbox").all():
                await box.check()
            async with page.expect_navigation():
                await page.locator("button.submit").click()
            assert page.url.endswith("/offer")
            await assert_logo_name_fits(page)
            body = await page.locator("main").inner_text()
            assert re.search(r"Released on \d+ \w+ \d{4} at \d\d:\d\d CES?T", body), body
            assert "Exposé Villa am See.pdf" in await page.locator(".files").inner_text()
            await page.screenshot(path=str(shots / "offer-en.png"), full_page=True)

            # the released copy's download page names the agent as the letter page does
            arrived = await site.sink.expect(3)
            [released] = [m for m in arrived[1:] if m.rcpt_tos == [PROSPECT]]
            text, _ = parts_of(released.data)
            [download] = re.findall(rf"{re.escape(site.url)}/d/[A-Za-z0-9_-]+", text)
            await page.goto(download)
            await assert_logo_name_fits(page)
            body = await page.locator("main").inner_text()
            assert f"Anna Agent ({AGENT}) has shared files with you." in body, body
            assert re.search(r"Available until \d+ \w+ \d{4}, \d\d:\d\d CES?T", body), body
            await page.screenshot(path=str(shots / "download-en.png"), full_page=True)
            await context.close()
        finally:
            await browser.close()


async def assert_logo_name_fits(page: Any) -> None:
    """The alt text, laid out in the logo's own box and font, needs no more than that box."""
    logo = page.locator("header img")
    assert await logo.count() == 1
    natural, needed, box = await logo.evaluate(
        """img => {
            const style = getComputedStyle(img);
            const box = img.getBoundingClientRect();
            const probe = document.createElement("span");
            probe.textContent = img.alt;
            Object.assign(probe.style, {
                position: "absolute", visibility: "hidden", display: "block",
                width: box.width + "px", font: style.font, lineHeight: style.lineHeight,
                letterSpacing: style.letterSpacing, overflowWrap: "break-word",
            });
            document.body.appendChild(probe);
            const needed = probe.getBoundingClientRect().height;
            probe.remove();
            return [img.naturalWidth, needed, {width: box.width, height: box.height}];
        }"""
    )
    assert natural == 0, "the logo was meant not to load"
    assert needed <= box["height"] + 0.5, (needed, box)
