"""Health and metrics over real HTTP."""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path

import aiohttp

from tests.conftest import Harness, make_message
from web.guard import CONSOLE_LOGIN


async def test_healthz_and_metrics(relay: Harness) -> None:
    await relay.send(make_message())
    await relay.sink.expect(1)
    delivered = 'sealrelay_delivery_outcomes_total{outcome="delivered"}'
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{relay.web_url}/healthz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        # the outcome is counted once recorded, which may be just after the sink's 250
        async with asyncio.timeout(15):
            while True:
                async with http.get(f"{relay.web_url}/metrics") as response:
                    assert response.status == 200
                    text = await response.text()
                if delivered in text:
                    break
                await asyncio.sleep(0.05)
    assert 'sealrelay_smtp_replies_total{code="250"}' in text
    assert "sealrelay_queue_deliveries" in text
    assert 'sealrelay_delivery_outcomes_total{outcome="delivered"}' in text
    assert f'sealrelay_build_info{{version="{metadata.version("sealrelay")}"}} 1.0' in text


async def test_healthz_reports_a_dead_database(relay: Harness) -> None:
    await relay.relay.db.engine.dispose()
    original = relay.relay.db.transaction

    def broken():  # type: ignore[no-untyped-def]
        raise OSError("database is gone")

    relay.relay.db.transaction = broken  # type: ignore[method-assign]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{relay.web_url}/healthz") as response,
        ):
            assert response.status == 503
            assert (await response.json())["status"] == "error"
    finally:
        relay.relay.db.transaction = original  # type: ignore[method-assign]


async def test_typed_addresses_lead_to_the_console_and_unknown_paths_get_a_page(
    relay: Harness, tmp_path: Path
) -> None:
    """What someone who types the server's address, or follows a link a mail program cut,
    gets: the root and /console lead on to the console's sign-in; any other unknown path
    gets the link-not-found page in the browser's language (as Chromium draws it), the API
    its problem details; every response names the server without a version."""
    from tests.browser import assert_error_page_reads_clean

    base = relay.web_url
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/console/"
            assert response.headers["Server"] == "sealrelay"
        for path in ("/", "/console"):
            async with http.get(base + path) as response:
                assert response.status == 200
                assert response.url.path == CONSOLE_LOGIN
        for method in ("GET", "HEAD", "POST"):
            async with http.request(
                method, f"{base}/Expos%C3%A9.pdf", headers={"Accept-Language": "de-DE"}
            ) as response:
                assert response.status == 404
                assert response.content_type == "text/html"
                assert response.headers["Server"] == "sealrelay"
                if method != "HEAD":
                    assert "Link nicht gefunden" in await response.text()
        async with http.get(f"{base}/api/v1/nothing") as response:
            assert response.status == 404
            assert response.content_type == "application/problem+json"
            assert response.headers["Server"] == "sealrelay"
        async with http.post(f"{base}/healthz") as response:
            assert response.status == 405  # a known path: aiohttp's answer, with the Allow header
            assert response.headers["Allow"] == "GET,HEAD"
        async with http.get(f"{base}/robots.txt") as response:  # crawlers that ask stay out
            assert response.status == 200
            assert response.content_type == "text/plain"
            assert await response.text() == "User-agent: *\nDisallow: /\n"
        for path in ("/healthz", "/static/base.css", "/console/login", "/d/unknown-token"):
            async with http.get(base + path) as response:
                assert response.headers["Server"] == "sealrelay", path
    await assert_error_page_reads_clean(
        f"{base}/Expos%C3%A9.pdf",
        locale="en-GB",
        status=404,
        text="This link does not exist",
        shots=tmp_path,
        name="unknown-path",
    )
