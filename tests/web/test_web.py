"""Health and metrics over real HTTP."""

from __future__ import annotations

import aiohttp

from tests.conftest import Harness, make_message


async def test_healthz_and_metrics(relay: Harness) -> None:
    await relay.send(make_message())
    await relay.sink.expect(1)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{relay.web_url}/healthz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        async with http.get(f"{relay.web_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    assert 'sealrelay_smtp_replies_total{code="250"}' in text
    assert "sealrelay_queue_deliveries" in text
    assert 'sealrelay_delivery_outcomes_total{outcome="delivered"}' in text


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
