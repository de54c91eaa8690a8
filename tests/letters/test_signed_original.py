"""The released original a lawyer downloads is the copy the prospect's server accepted: DKIM-
signed over the click's evidence headers, byte for byte. Before it is delivered, the console
and the API hand out the copy as queued, marked unsigned, and the console says so.
Through the console and the API of a running relay, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway.console.api_keys import ApiKeyDesk
from gateway.letters.desk import UNSIGNED_HEADER
from gateway.letters.evidence import parse_evidence
from gateway.mail import headers
from gateway.store.models import ApiKeyScope, Consent, Delivery, utcnow
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT, PASSWORD, dkim_dns
from tests.console.browser_sign_in import sign_in
from tests.console.client import ConsoleClient
from tests.console.work_world import get_bytes
from tests.letter_site import PROSPECT, Clock, LetterSite, offer
from tests.queue_wait import queue_idle

DEFER = "451 4.3.0 Try again later"
SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/trust-fixes"))


@pytest.fixture
async def console(site: LetterSite) -> AsyncIterator[ConsoleClient]:
    async with ConsoleClient(site.url) as browser:
        assert (await browser.sign_in(AGENT, PASSWORD)).status == 303
        yield browser


async def from_api(site: LetterSite, letter_id: str) -> tuple[bytes, str]:
    key = await ApiKeyDesk(site.relay.db, utcnow).create("lawyer", ApiKeyScope.READ, "test")
    async with (
        ConsoleClient(site.url) as http,
        http.http.get(
            f"{site.url}/api/v1/letters/{letter_id}/original.eml",
            headers={"Authorization": f"Bearer {key.key}"},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.read(), response.headers["Content-Disposition"]


def signed_names(copy: bytes) -> list[str]:
    [signature] = headers.values(headers.fields_of(copy), "dkim-signature")
    tags = dict(
        part.strip().split("=", 1) for part in "".join(signature.split()).split(";") if part
    )
    return tags["h"].lower().split(":")


async def test_the_released_original_is_the_signed_copy_the_prospect_got(
    site: LetterSite, console: ConsoleClient, clock: Clock
) -> None:
    token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    count = len(site.sink.messages)
    assert (await site.consent(token)).status == 303
    await site.sink.expect(count + 2)  # the released original and the agent's confirmation
    await queue_idle(site.relay.db)
    [received] = [
        m.data
        for m in site.sink.messages[count:]
        if m.rcpt_tos == [PROSPECT] and b"X-Sealrelay-Consent" in m.data
    ]
    async with site.relay.db.transaction() as session:
        consent = (await session.scalars(select(Consent))).one()

    path = f"/console/messages/{letter.message_id}/letters/{letter.id}/original.eml"
    status, eml, answer = await get_bytes(console, path)
    assert status == 200 and answer["Content-Type"] == "message/rfc822"
    assert f"original-{letter.id}.eml" in answer["Content-Disposition"]
    api_eml, disposition = await from_api(site, letter.id)
    assert f"released-{letter.id}.eml" in disposition
    for copy in (eml, api_eml):
        assert copy == received, "not the bytes the recipient's server accepted"
        assert dkimpy.verify(copy, dnsfunc=dkim_dns(site.harness.dkim_key))
        evidence = parse_evidence(copy)
        assert evidence.consent_id == consent.id and evidence.ip == consent.ip
        # the evidence is signed, and oversigned: none can be added to the copy later
        assert signed_names(copy).count("x-sealrelay-consent") == 2
        assert UNSIGNED_HEADER.encode() not in copy
    page = await console.get(f"/console/messages/{letter.message_id}")
    assert "Released original (.eml)</a>" in page.text and "not delivered yet" not in page.text

    # kept as evidence: the sweep years later leaves the signed copy
    clock.advance(days=400)
    await site.relay.sweep_once()
    kept = await site.relay.letters.released_original(letter.id, AGENT)
    assert kept.signed and kept.data == received


async def test_before_delivery_the_copy_is_marked_unsigned_and_the_console_says_so(
    site: LetterSite, console: ConsoleClient
) -> None:
    token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    site.sink.refuse[PROSPECT] = DEFER
    assert (await site.consent(token)).status == 303
    async with site.relay.db.transaction() as session:
        released_id = (await session.scalars(select(Consent.released_delivery_id))).one()

    async def attempts() -> int:
        async with site.relay.db.transaction() as session:
            delivery = await session.get(Delivery, released_id)
            assert delivery is not None
            return delivery.attempts

    async with asyncio.timeout(30):  # deferred once: tried, refused, queued again
        while await attempts() == 0:
            await asyncio.sleep(0.05)

    path = f"/console/messages/{letter.message_id}/letters/{letter.id}/original.eml"
    status, eml, answer = await get_bytes(console, path)
    assert status == 200
    assert f"original-{letter.id}-unsigned.eml" in answer["Content-Disposition"]
    marker = headers.first_value(headers.fields_of(eml), UNSIGNED_HEADER) or ""
    assert marker.startswith("not delivered yet")
    assert headers.values(headers.fields_of(eml), "dkim-signature") == []
    assert b"X-Sealrelay-Consent" in eml  # the evidence, as it will be signed
    api_eml, disposition = await from_api(site, letter.id)
    assert api_eml == eml and f"released-{letter.id}-unsigned.eml" in disposition
    page = await console.get(f"/console/messages/{letter.message_id}")
    assert "not delivered yet, so the unsigned copy as queued" in page.text

    count = len(site.sink.messages)
    del site.sink.refuse[PROSPECT]
    await site.sink.expect(count + 1)
    await queue_idle(site.relay.db)
    [received] = [m.data for m in site.sink.messages[count:] if m.rcpt_tos == [PROSPECT]]
    status, eml, answer = await get_bytes(console, path)
    assert eml == received and dkimpy.verify(eml, dnsfunc=dkim_dns(site.harness.dkim_key))
    page = await console.get(f"/console/messages/{letter.message_id}")
    assert "not delivered yet" not in page.text
    parsed = email.message_from_bytes(eml, policy=email.policy.default)
    assert parsed["X-Sealrelay-Consent"] is not None


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_not_yet_delivered_original_reads_clean_on_a_phone_and_a_desktop(
    site: LetterSite, tmp_path: Path
) -> None:
    token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    site.sink.refuse[PROSPECT] = DEFER
    assert (await site.consent(token)).status == 303
    async_playwright = playwright_api()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for size, viewport, locale, label in (
                ("phone", PHONE, "de-DE", "noch nicht zugestellt"),
                ("desktop", {"width": 1280, "height": 800}, "en-GB", "not delivered yet"),
            ):
                page = await sign_in(browser, site.url, AGENT, viewport, locale)
                await page.goto(f"{site.url}/console/messages/{letter.message_id}")
                link = page.locator("a[href$='/original.eml']")
                assert label in await link.inner_text()
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"]
                shot = tmp_path / f"unsigned-original-{size}.png"
                await page.screenshot(path=str(shot), full_page=True)
                SCREENS.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, SCREENS / shot.name)
                await page.context.close()
        finally:
            await browser.close()
