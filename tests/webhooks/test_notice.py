"""The admins' notice that an endpoint was disabled: its wording in each shipped language,
no placeholder left, and how it reads in a real Chromium on a phone and a desktop."""

from __future__ import annotations

import email
import email.policy
import html
import re
import shutil
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.mail.own_mail import render
from gateway.store.models import WebhookEndpoint
from gateway.webhooks.notice import disabled_notice
from rules.language import SHIPPED_LANGUAGES
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.support import screenshot_dir

DESKTOP = {"width": 1280, "height": 900}
PAGE = """<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="margin:0;font-family:Arial,Helvetica,sans-serif;background:#fff">
<p style="margin:0;padding:16px 16px 0;font-weight:bold">{subject}</p>
<pre style="margin:0;padding:16px;white-space:pre-wrap;overflow-wrap:anywhere;
font-family:Menlo,Consolas,'DejaVu Sans Mono',monospace;font-size:14px">{text}</pre>
</body></html>"""
WORDS = {"de": "abgeschaltet", "en": "disabled", "es": "desactivado"}


def notice(language: str) -> EmailMessage:
    endpoint = WebhookEndpoint(
        id="01a2374bf3afe8f07871",
        url="https://crm.broker.example/hooks/sealrelay?tenant=lindenweg-immobilien",
        description="CRM: follow-up tasks\nfor agents",
    )
    mail = disabled_notice(
        endpoint,
        admin="it@broker.example",
        days=3,
        last_error="ClientConnectorError: Cannot connect to host crm.broker.example:443",
        failing_since=datetime(2026, 11, 28, 9, 30, tzinfo=UTC),
        language=language,
    )
    raw = render(
        mail,
        sender="postmaster@relay.broker.example",
        hostname="relay.broker.example",
        now=datetime(2026, 12, 1, 9, 31, tzinfo=UTC),
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize("language", SHIPPED_LANGUAGES)
def test_the_notice_says_what_happened_and_what_to_do(language: str) -> None:
    parsed = notice(language)
    subject = str(parsed["Subject"])
    text = parsed.get_content()
    assert WORDS[language] in subject.lower()
    assert "https://crm.broker.example/hooks/sealrelay" in subject
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Content-Language"] is None or parsed["Content-Language"] == language
    assert "sealrelay webhook enable 01a2374bf3afe8f07871" in text
    assert 'sealrelay webhook replay 01a2374bf3afe8f07871 --since "2026-11-28T09:30:00Z"' in text
    assert "2026-11-28 09:30 UTC" in text
    assert {"de": "Seit 3 Tagen", "en": "for 3 days", "es": "durante 3 días"}[language] in text
    assert "CRM: follow-up tasks for agents" in text  # the description on one line
    assert not re.search(r"\{[a-z_]+\}", text), text


async def test_the_notice_reads_well_on_a_phone_and_a_desktop(tmp_path: Path) -> None:
    async with playwright_api()() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            for language in SHIPPED_LANGUAGES:
                parsed = notice(language)
                content = PAGE.format(
                    lang=language,
                    subject=html.escape(str(parsed["Subject"])),
                    text=html.escape(parsed.get_content()),
                )
                for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                    context = await browser.new_context(
                        viewport=viewport, device_scale_factor=2 if name == "phone" else 1
                    )
                    page = await context.new_page()
                    await page.set_content(content)
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    assert width <= viewport["width"], (language, name, width)
                    shot = tmp_path / f"webhook-disabled-{language}-{name}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    shutil.copy(shot, screenshot_dir("webhooks") / shot.name)
                    await context.close()
        finally:
            await browser.close()
