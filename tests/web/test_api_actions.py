"""What agents do through the API (links, letters) and webhook endpoints through the API, on a
running relay, on SQLite and PostgreSQL: the happy paths, and every refusal leaving nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from gateway.console.api_keys import ApiKeyDesk
from gateway.mail.evidence_headers import CONSENT_HEADER, RELEASED_BY_AGENT_HEADER
from gateway.store.models import (
    ApiKeyScope,
    Delivery,
    Event,
    Link,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from gateway.store.sequencer import chain_all
from tests.conftest import Harness
from tests.letter_site import PROSPECT, LetterSite, offer, token_in
from tests.queue_wait import queue_idle
from tests.webhooks.receiver import Receiver

OTTO = "otto@example.com"


class Api:
    """A CRM with a write key (and a read key) against the site's /api/v1."""

    def __init__(self, http: aiohttp.ClientSession, base: str, write: str, read: str) -> None:
        self.http, self.base = http, base + "/api/v1"
        self.write = {"Authorization": f"Bearer {write}"}
        self.read = {"Authorization": f"Bearer {read}"}

    async def call(
        self, method: str, path: str, body: Any = None, *, read: bool = False
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = self.read if read else self.write
        async with self.http.request(method, self.base + path, headers=headers, json=body) as r:
            if r.status >= 400:
                assert r.content_type == "application/problem+json", await r.text()
            if r.content_type.endswith("json"):
                return r.status, await r.json(), r
            return r.status, await r.read(), r


async def _api(relay: Any, base: str) -> AsyncIterator[Api]:
    desk = ApiKeyDesk(relay.db, utcnow)
    write = await desk.create("crm", ApiKeyScope.WRITE, "test")
    read = await desk.create("crm read", ApiKeyScope.READ, "test")
    async with aiohttp.ClientSession() as http:
        yield Api(http, base, write.key, read.key)


@pytest.fixture
async def letter_api(site: LetterSite) -> AsyncIterator[Api]:
    async for api in _api(site.relay, site.url):
        yield api


@pytest.fixture
async def hook_api(relay: Harness) -> AsyncIterator[Api]:
    async for api in _api(relay.relay, relay.web_url):
        yield api


async def written(site: LetterSite) -> tuple[int, int, int, int]:
    """Events, copies, links and revoked links: what a refused action must leave as it was."""
    await queue_idle(site.relay.db)
    async with site.relay.db.transaction() as session:

        async def count(model: Any, *where: Any) -> int:
            return int(await session.scalar(select(func.count()).select_from(model).where(*where)))

        return (
            await count(Event),
            await count(Delivery),
            await count(Link),
            await count(Link, Link.revoked_at.is_not(None)),
        )


async def _recipient(api: Api, recipient: str) -> tuple[str, dict[str, Any]]:
    status, page, _ = await api.call("GET", f"/messages?q={recipient}", read=True)
    assert status == 200, page
    message_id = page["items"][0]["id"]
    status, detail, _ = await api.call("GET", f"/messages/{message_id}", read=True)
    [story] = [r for r in detail["recipients"] if r["address"] == recipient]
    return message_id, story


async def test_links_and_letters_through_the_api(site: LetterSite, letter_api: Api) -> None:
    api = letter_api
    token, _ = await site.send_offer(offer(big=False))
    message_id, story = await _recipient(api, PROSPECT)
    [letter] = story["letters"]
    [link] = story["links"]
    assert letter["status"] == "held" and link["kind"] == "letter"
    letter_id, links = f"/letters/{letter['id']}", f"/messages/{message_id}/recipients/{PROSPECT}"
    now = site.clock()

    before = await written(site)
    refused = [
        ("POST", f"{letter_id}/release", {}, 422),
        ("POST", f"{letter_id}/release", {"reason": "   "}, 422),
        ("POST", f"{letter_id}/release", {"reason": "x" * 501}, 422),
        ("GET", f"{letter_id}/consent.pdf", None, 409),
        ("GET", f"{letter_id}/original.eml", None, 409),
        ("POST", "/letters/nosuchletter/resend", None, 404),
        ("POST", "/letters/nosuchletter/release", {"reason": "asked"}, 404),
        ("GET", "/letters/nosuchletter/consent.pdf", None, 404),
        ("POST", f"/messages/{message_id}/recipients/nobody@example.com/revoke", {}, 404),
        ("POST", f"/messages/nosuchmessage/recipients/{PROSPECT}/revoke", {}, 404),
        ("POST", f"{links}/extend", {"until": "2030-01-01T00:00:00"}, 422),  # no zone
        ("POST", f"{links}/extend", {"until": (now - timedelta(1)).isoformat()}, 422),
        ("POST", f"{links}/extend", {"until": (now + timedelta(400)).isoformat()}, 422),
        ("POST", f"{links}/extend", {"until": 1893456000}, 422),
        ("POST", f"{links}/revoke", {"reason": 5}, 422),
    ]
    for method, path, body, expected in refused:
        status, problem, _ = await api.call(method, path, body)
        assert status == expected, (method, path, body, problem)
        assert problem["status"] == expected and problem["detail"]
    status, _, _ = await api.call("POST", f"{letter_id}/resend", read=True)
    assert status == 403
    assert await written(site) == before

    until = now + timedelta(days=5)
    status, changed, _ = await api.call("POST", f"{links}/extend", {"until": until.isoformat()})
    assert status == 200 and changed == {"link_ids": [link["id"]]}
    status, ended, _ = await api.call("POST", f"{links}/revoke", {"reason": "wrong prospect"})
    assert status == 200 and ended == {"link_ids": [link["id"]]}
    [revoked] = await site.events("link.revoked")
    assert revoked.data["actor"] == "api key crm" and revoked.data["reason"] == "wrong prospect"
    status, again, _ = await api.call("POST", f"{links}/revoke", {})
    assert status == 200 and again == {"link_ids": []}
    status, problem, _ = await api.call("POST", f"{links}/extend", {"until": until.isoformat()})
    assert status == 409 and "revoked" in problem["detail"]
    assert problem["code"] == "action.revoked"
    response, _ = await site.get(f"/l/{token}")
    assert response.status == 410

    count = len(site.sink.messages)
    status, queued, _ = await api.call("POST", f"{letter_id}/resend")
    assert status == 202 and queued["letter_id"] == letter["id"], queued
    await site.sink.expect(count + 1)
    [fresh] = [m for m in site.sink.messages[count:] if m.rcpt_tos == [PROSPECT]]
    _, story = await _recipient(api, PROSPECT)
    assert [k["revoked_at"] is None for k in story["links"]] == [False, True]
    assert (await site.consent(token_in(fresh.data, site.url))).status == 303
    status, pdf, response = await api.call("GET", f"{letter_id}/consent.pdf", read=True)
    assert status == 200 and response.content_type == "application/pdf"
    assert pdf.startswith(b"%PDF")
    assert f"consent-{letter['id']}.pdf" in response.headers["Content-Disposition"]
    status, eml, response = await api.call("GET", f"{letter_id}/original.eml", read=True)
    assert status == 200 and response.content_type == "message/rfc822"
    assert CONSENT_HEADER.encode() in eml and RELEASED_BY_AGENT_HEADER.encode() not in eml
    before = await written(site)
    for method, path, body in (
        ("POST", f"{letter_id}/resend", None),
        ("POST", f"{letter_id}/release", {"reason": "asked by phone"}),
    ):
        status, problem, _ = await api.call(method, path, body)
        assert status == 409 and "released" in problem["detail"]
    assert await written(site) == before

    # another prospect's offer, released by the agent: no consent, so no PDF
    await site.send_offer(offer(big=False), recipient=OTTO)
    _, story = await _recipient(api, OTTO)
    other = f"/letters/{story['letters'][0]['id']}"
    count = len(site.sink.messages)
    status, queued, _ = await api.call("POST", f"{other}/release", {"reason": "asked by phone"})
    assert status == 202, queued
    await site.sink.expect(count + 1)
    status, eml, _ = await api.call("GET", f"{other}/original.eml")
    assert status == 200 and RELEASED_BY_AGENT_HEADER.encode() in eml
    status, _, _ = await api.call("GET", f"{other}/consent.pdf")
    assert status == 409
    [released] = await site.events("letter.released_by_agent")
    assert released.data["actor"] == "api key crm" and released.data["reason"] == "asked by phone"
    assert len(await site.events("consent.given")) == 1


async def test_webhook_endpoints_through_the_api(relay: Harness, hook_api: Api) -> None:
    api = hook_api
    status, problem, _ = await api.call("POST", "/webhooks", {"url": "http://127.0.0.1:9/hook"})
    assert status == 422 and "loopback" in problem["detail"], problem
    for bad in ("ftp://crm.example.com/", "http://", "http://crm example.com/", "x" * 2001):
        status, problem, _ = await api.call("POST", "/webhooks", {"url": bad})
        assert status == 422, (bad, problem)
    status, problem, _ = await api.call(
        "POST", "/webhooks", {"url": "http://[::1]/h", "event_types": ["message.sent"]}
    )
    assert status == 422 and problem["errors"][0]["field"].startswith("event_types")
    status, problem, _ = await api.call("POST", "/webhooks", {"url": "http://10.0.0.1/", "x": 1})
    assert status == 422
    status, _, _ = await api.call("POST", "/webhooks", {"url": "http://10.1.2.3/"}, read=True)
    assert status == 403
    async with relay.relay.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(WebhookEndpoint)) == 0

    status, made, _ = await api.call(
        "POST",
        "/webhooks",
        {
            "url": "http://127.0.0.1:9/hook",
            "allow_private": True,
            "enabled": False,
            "event_types": ["consent.given"],
            "description": "CRM on premises",
        },
    )
    assert status == 201, made
    assert made["secret"].startswith("whsec_") and made["enabled"] is False
    one = f"/webhooks/{made['id']}"
    status, listed, _ = await api.call("GET", "/webhooks", read=True)
    assert status == 200 and [e["id"] for e in listed["items"]] == [made["id"]]
    assert all("secret" not in e for e in listed["items"])
    status, shown, _ = await api.call("GET", one, read=True)
    assert status == 200 and "secret" not in shown and shown["description"] == "CRM on premises"

    status, problem, _ = await api.call("POST", f"{one}/test")
    assert status == 409 and "disabled" in problem["detail"]
    status, problem, _ = await api.call("POST", f"{one}/replay", {"seq": 1})
    assert status == 409
    status, problem, _ = await api.call("PATCH", one, {"allow_private": False, "enabled": True})
    assert status == 422 and "loopback" in problem["detail"]
    status, shown, _ = await api.call("GET", one)
    assert shown["allow_private"] is True and shown["enabled"] is False  # nothing half-done

    status, changed, _ = await api.call("PATCH", one, {"enabled": True, "event_types": []})
    assert status == 200 and changed["enabled"] is True and changed["event_types"] == []
    for body in ({}, {"seq": 1, "since": "2026-01-01T00:00:00Z"}, {"seq": 0}):
        status, problem, _ = await api.call("POST", f"{one}/replay", body)
        assert status == 422, (body, problem)
    status, problem, _ = await api.call("POST", f"{one}/replay", {"seq": 2**40})
    assert status == 422 and "no event" in problem["detail"]
    status, tested, _ = await api.call("POST", f"{one}/test")
    assert status == 202 and tested["seq"] > 0
    status, replayed, _ = await api.call("POST", f"{one}/replay", {"seq": tested["seq"]})
    assert status == 202 and replayed == {"queued": 1}
    status, deliveries, _ = await api.call("GET", f"{one}/deliveries?limit=10", read=True)
    assert status == 200
    # the replayed one at least; the fan-out may have queued the first meanwhile
    assert tested["seq"] in [d["event_seq"] for d in deliveries["items"]]
    status, _, _ = await api.call("GET", f"{one}/deliveries?limit=0")
    assert status == 400

    status, rotated, _ = await api.call("POST", f"{one}/rotate-secret")
    assert status == 200 and rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != made["secret"] and rotated["previous_secret_until"]
    status, _, _ = await api.call("DELETE", one, read=True)
    assert status == 403
    status, _, _ = await api.call("DELETE", one)
    assert status == 204
    for method, path in (
        ("GET", one),
        ("DELETE", one),
        ("POST", f"{one}/rotate-secret"),
        ("GET", f"{one}/deliveries"),
    ):
        status, _, _ = await api.call(method, path)
        assert status == 404, (method, path)
    async with relay.relay.db.transaction() as session:
        types = list(
            await session.scalars(
                select(Event.type).where(Event.type.like("webhook.endpoint%")).order_by(Event.id)
            )
        )
    assert types == [
        "webhook.endpoint_created",
        "webhook.endpoint_changed",  # event types
        "webhook.endpoint_changed",  # enabled
        "webhook.endpoint_changed",  # secret
        "webhook.endpoint_deleted",
    ]


async def test_the_secret_the_api_returns_is_the_one_that_signs(
    relay: Harness, hook_api: Api
) -> None:
    """Create, test, rotate, test again and replay through the API; a real receiver checks
    the signatures with the standardwebhooks package."""
    receiver = await Receiver().start()
    try:
        status, made, _ = await hook_api.call(
            "POST",
            "/webhooks",
            {"url": receiver.url, "allow_private": True, "event_types": ["webhook.test"]},
        )
        assert status == 201, made
        one = f"/webhooks/{made['id']}"
        status, tested, _ = await hook_api.call("POST", f"{one}/test")
        assert status == 202
        [first] = await receiver.expect(1)
        assert first.verify(made["secret"])["data"]["seq"] == tested["seq"]

        status, rotated, _ = await hook_api.call("POST", f"{one}/rotate-secret")
        assert status == 200
        status, _, _ = await hook_api.call("POST", f"{one}/test")
        second = (await receiver.expect(2))[1]
        second.verify(rotated["secret"])
        assert second.signed_by(made["secret"])  # the previous one signs during the grace
        assert not first.signed_by(rotated["secret"])

        status, replayed, _ = await hook_api.call("POST", f"{one}/replay", {"seq": tested["seq"]})
        assert status == 202 and replayed == {"queued": 1}
        again = (await receiver.expect(3))[2]
        assert again.id == first.id and again.body == first.body  # the receiver can dedupe
        again.verify(rotated["secret"])
    finally:
        await receiver.stop()


async def test_a_time_range_is_replayed_through_the_api(
    relay: Harness, hook_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's replay of a range: what it queues, and its refusals (reversed or empty
    range, a zone-less time, too many events, an unknown endpoint) writing nothing."""
    api = hook_api
    await chain_all(relay.relay.db)
    async with relay.relay.db.transaction() as session:
        first = await session.scalar(select(func.min(Event.at)))
        last = int(await session.scalar(select(func.max(Event.seq))) or 0)
    # the fan-out posts what comes after the endpoint; only a replay queues these
    total = last
    assert first is not None and total > 2
    status, made, _ = await api.call(
        "POST",
        "/webhooks",
        {"url": "http://127.0.0.1:9/hook", "allow_private": True, "enabled": False},
    )
    assert status == 201
    one = f"/webhooks/{made['id']}"
    since = (first - timedelta(seconds=1)).isoformat()
    until = (utcnow() + timedelta(minutes=1)).isoformat()
    status, problem, _ = await api.call("POST", f"{one}/replay", {"since": since})
    assert status == 409 and "enable it first" in problem["detail"]
    status, _, _ = await api.call("PATCH", one, {"enabled": True})
    assert status == 200
    refused: list[tuple[dict[str, Any], int, str]] = [
        ({"since": until, "until": since}, 422, "since must be before until"),
        ({"since": since, "until": since}, 422, "since must be before until"),
        ({"since": "2026-12-01T10:00:00", "until": until}, 422, ""),  # no zone
    ]
    monkeypatch.setattr("gateway.webhooks.desk.REPLAY_LIMIT", total - 2)
    refused.append(({"since": since, "until": until}, 422, f"more than {total - 2} events"))
    for body, want, detail in refused:
        status, problem, _ = await api.call("POST", f"{one}/replay", body)
        assert status == want and detail in problem["detail"], (body, problem)
    status, _, _ = await api.call("POST", "/webhooks/no-such/replay", {"since": since})
    assert status == 404
    async with relay.relay.db.transaction() as session:
        replays = select(func.count()).where(WebhookDelivery.event_seq <= last)
        assert await session.scalar(replays) == 0

    monkeypatch.undo()
    status, replayed, _ = await api.call("POST", f"{one}/replay", {"since": since, "until": until})
    assert status == 202 and replayed["queued"] >= total  # and what was journaled since
    status, again, _ = await api.call("POST", f"{one}/replay", {"since": since, "until": until})
    assert status == 202 and again["queued"] < replayed["queued"], "still queued: not twice"
