"""The JSON API through a real relay: who may call what, scope, pagination, bad input."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import update

from gateway import users
from gateway.access import MessageScope, Permission, Principal
from gateway.console.admin import QueueDesk
from gateway.console.api_keys import ApiKeyDesk
from gateway.console.timeline import Timeline
from gateway.store.db import Database
from gateway.store.models import ApiKeyScope, Delivery, Role, utcnow
from gateway.store.sequencer import chain_all
from sealrelay.serve import Relay
from tests.conftest import Harness, make_message, relay_settings
from tests.console.seeding import seed_message
from tests.queue_wait import queue_idle
from tests.support import free_port
from web.api.auth import bearer_authenticator
from web.api.problems import api_problems
from web.app import api, create_app
from web.guard import RULES, Routes, guard

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
_emails = itertools.count()


@dataclass
class Keys:
    read: str
    write: str
    revoked: str


@pytest.fixture
async def keys(relay: Harness) -> Keys:
    desk = ApiKeyDesk(relay.relay.db, utcnow)
    read = await desk.create("crm read", ApiKeyScope.READ, "test")
    write = await desk.create("crm write", ApiKeyScope.WRITE, "test")
    gone = await desk.create("old", ApiKeyScope.WRITE, "test")
    await desk.revoke(gone.info.id, "test")
    return Keys(read.key, write.key, gone.key)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


_RECIPIENT = "/api/v1/messages/{id}/recipients/{recipient}"
_NOBODY = {"id": "nosuchmessage", "recipient": "p@example.com"}


# Each API route, how to call it: path values and a body. A route missing here fails the test.
def _cases() -> dict[tuple[str, str], tuple[dict[str, str], Any]]:
    return {
        ("GET", "/api/v1/messages"): ({}, None),
        ("GET", "/api/v1/messages/{id}"): ({"id": "nosuchmessage"}, None),
        ("GET", "/api/v1/events"): ({}, None),
        ("GET", "/api/v1/api-keys"): ({}, None),
        ("POST", "/api/v1/api-keys"): ({}, {"name": "made in a test", "scope": "read"}),
        ("DELETE", "/api/v1/api-keys/{id}"): ({"id": "nosuchkey"}, None),
        ("GET", "/api/v1/users"): ({}, None),
        ("POST", "/api/v1/users"): ({}, lambda: {"email": f"new{next(_emails)}@broker.example"}),
        ("PATCH", "/api/v1/users/{email}"): (
            {"email": "nobody@broker.example"},
            {"disabled": True},
        ),
        ("DELETE", "/api/v1/users/{email}"): ({"email": "nobody@broker.example"}, None),
        ("POST", "/api/v1/users/{email}/password"): ({"email": "nobody@broker.example"}, None),
        ("POST", "/api/v1/users/{email}/aliases"): (
            {"email": "nobody@broker.example"},
            {"address": "desk@broker.example"},
        ),
        ("DELETE", "/api/v1/users/{email}/aliases/{alias}"): (
            {"email": "nobody@broker.example", "alias": "desk@broker.example"},
            None,
        ),
        ("GET", "/api/v1/users/{email}/upstream-login"): ({"email": "nobody@broker.example"}, None),
        ("PUT", "/api/v1/users/{email}/upstream-login"): (
            {"email": "nobody@broker.example"},
            {"url": "smtp://mail.example", "username": "u", "password": "secret 1"},
        ),
        ("DELETE", "/api/v1/users/{email}/upstream-login"): (
            {"email": "nobody@broker.example"},
            None,
        ),
        ("GET", "/api/v1/queue"): ({}, None),
        ("POST", "/api/v1/queue/{id}/retry"): ({"id": "nosuchcopy"}, None),
        ("DELETE", "/api/v1/queue/{id}"): ({"id": "nosuchcopy"}, None),
        ("POST", f"{_RECIPIENT}/revoke"): (_NOBODY, {"reason": "test"}),
        ("POST", f"{_RECIPIENT}/extend"): (_NOBODY, {"until": "2099-01-01T00:00:00Z"}),
        ("POST", "/api/v1/letters/{id}/resend"): ({"id": "nosuchletter"}, None),
        ("POST", "/api/v1/letters/{id}/release"): ({"id": "nosuchletter"}, {"reason": "asked"}),
        ("GET", "/api/v1/letters/{id}/consent.pdf"): ({"id": "nosuchletter"}, None),
        ("GET", "/api/v1/letters/{id}/original.eml"): ({"id": "nosuchletter"}, None),
        ("GET", "/api/v1/webhooks"): ({}, None),
        ("POST", "/api/v1/webhooks"): (
            {},
            {"url": "http://127.0.0.1:9/", "allow_private": True, "enabled": False},
        ),
        ("GET", "/api/v1/webhooks/{id}"): ({"id": "nosuchhook"}, None),
        ("PATCH", "/api/v1/webhooks/{id}"): ({"id": "nosuchhook"}, {"description": "x"}),
        ("DELETE", "/api/v1/webhooks/{id}"): ({"id": "nosuchhook"}, None),
        ("POST", "/api/v1/webhooks/{id}/rotate-secret"): ({"id": "nosuchhook"}, None),
        ("POST", "/api/v1/webhooks/{id}/test"): ({"id": "nosuchhook"}, None),
        ("POST", "/api/v1/webhooks/{id}/replay"): ({"id": "nosuchhook"}, {"seq": 1}),
        ("GET", "/api/v1/webhooks/{id}/deliveries"): ({"id": "nosuchhook"}, None),
        ("GET", "/api/v1/settings/policy"): ({}, None),
        ("GET", "/api/v1/settings/consent-texts"): ({}, None),
        ("GET", "/api/v1/settings/dkim"): ({}, None),
        ("GET", "/api/v1/openapi.json"): ({}, None),
    }


async def test_every_api_route_as_no_one_read_write_and_revoked(
    relay: Harness, keys: Keys, http: aiohttp.ClientSession
) -> None:
    app = create_app(relay.relay.web_parts())
    cases = _cases()
    read_permissions = Principal.for_api_key("k", "k", ApiKeyScope.READ).permissions
    tried = 0
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if not path.startswith("/api"):
            continue
        rule = app[RULES][route]
        method = "GET" if route.method == "HEAD" else route.method
        assert (method, path) in cases, f"no authorization case for {route.method} {path}"
        values, body = cases[(method, path)]
        url = relay.web_url + path.format(**values)
        expected_ok = {200, 201, 204, 404}
        for who, key in [
            ("no one", None),
            ("read", keys.read),
            ("write", keys.write),
            ("revoked", keys.revoked),
        ]:
            payload = body() if callable(body) else body
            async with http.request(
                route.method, url, headers=_bearer(key), json=payload
            ) as response:
                status = response.status
                if route.method != "HEAD" and status >= 400:
                    assert response.content_type == "application/problem+json", (who, path)
            where = f"{who} {route.method} {path}: {status}"
            if rule.needs is None:
                assert status == 200, where
            elif key is None or who == "revoked":
                assert status == 401, where
            elif who == "read" and rule.needs not in read_permissions:
                assert status == 403, where
            else:
                assert status in expected_ok, where
                if not values:
                    assert status != 404, where
            tried += 1
    assert tried >= len(cases) * 4


async def test_a_revoked_key_is_refused_at_once(
    relay: Harness, keys: Keys, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        relay.web_url + "/api/v1/api-keys",
        headers=_bearer(keys.write),
        json={"name": "short-lived", "scope": "read"},
    ) as r:
        assert r.status == 201
        made = await r.json()
    assert made["key"].startswith("sr_") and made["key"].startswith(made["prefix"])
    url = relay.web_url + "/api/v1/messages"
    async with http.get(url, headers=_bearer(made["key"])) as r:
        assert r.status == 200
    async with http.delete(
        relay.web_url + f"/api/v1/api-keys/{made['id']}", headers=_bearer(keys.write)
    ) as r:
        assert r.status == 204
    async with http.get(url, headers=_bearer(made["key"])) as r:
        assert r.status == 401
        assert (await r.json())["status"] == 401
    async with http.delete(
        relay.web_url + f"/api/v1/api-keys/{made['id']}", headers=_bearer(keys.write)
    ) as r:
        assert r.status == 409
        assert (await r.json())["code"] == "key.revoked"
    async with http.get(relay.web_url + "/api/v1/api-keys", headers=_bearer(keys.read)) as r:
        listed = {k["id"]: k for k in (await r.json())["items"]}
    assert listed[made["id"]]["revoked_at"] is not None
    assert listed[made["id"]]["last_used_at"] is not None
    assert "key" not in listed[made["id"]]


async def test_mail_sent_shows_up_in_messages_and_the_feed(
    relay: Harness, keys: Keys, http: aiohttp.ClientSession
) -> None:
    reply = await relay.send(make_message(to="prospect@example.com", subject="Villa <b>am</b> See"))
    await relay.sink.expect(1)
    headers = _bearer(keys.read)
    async with http.get(relay.web_url + "/api/v1/messages?q=villa", headers=headers) as r:
        page = await r.json()
    assert r.status == 200, page
    [item] = page["items"]
    assert item["id"] in reply
    assert item["subject"] == "Villa <b>am</b> See"
    await queue_idle(relay.relay.db)
    await chain_all(relay.relay.db)  # a second later: the feed lists chained events
    feed: list[dict[str, Any]] = []
    after = 0
    while True:  # a CRM catching up two events at a time
        async with http.get(
            relay.web_url + "/api/v1/events",
            params={"after": after, "message_id": item["id"], "limit": 2},
            headers=headers,
        ) as r:
            body = await r.json()
        if not body["events"]:
            assert body["next_after"] == after
            break
        feed += body["events"]
        after = body["next_after"]
    types = [e["type"] for e in feed]
    assert types[0] == "message.received" and "delivery.delivered" in types
    async with http.get(relay.web_url + f"/api/v1/messages/{item['id']}", headers=headers) as r:
        detail = await r.json()
    [recipient] = detail["recipients"]
    assert recipient["address"] == "prospect@example.com"
    assert recipient["state"] == "delivered"
    assert [e["type"] for e in recipient["events"]][-1] == "delivery.delivered"


async def test_bad_input_gets_a_problem_naming_the_parameter(
    relay: Harness, keys: Keys, http: aiohttp.ClientSession
) -> None:
    base = relay.web_url + "/api/v1"
    read, write = _bearer(keys.read), _bearer(keys.write)

    async def problem(
        method: str, url: str, headers: dict[str, str], **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        async with http.request(method, url, headers=headers, **kw) as r:
            assert r.content_type == "application/problem+json", await r.text()
            return r.status, await r.json()

    status, body = await problem("GET", base + "/messages?cursor=garbage", read)
    assert status == 400 and body["errors"][0]["parameter"] == "cursor"
    for limit in ("0", "201", "ten"):
        status, body = await problem("GET", base + f"/messages?limit={limit}", read)
        assert status == 400 and body["errors"][0]["parameter"] == "limit"
    status, body = await problem("GET", base + "/events?limit=1001", read)
    assert status == 400 and body["errors"][0]["parameter"] == "limit"
    status, body = await problem("GET", base + "/events?type=message.received&type=nope", read)
    assert status == 400 and body["errors"][0]["parameter"] == "type.1"
    status, body = await problem("GET", base + "/events?after=-1", read)
    assert status == 400
    status, body = await problem("GET", base + "/messages?limit=1&limit=2", read)
    assert status == 400 and body["errors"][0]["parameter"] == "limit"
    status, body = await problem("GET", base + "/messages?since=2026-01-01T00:00:00", read)
    assert status == 400 and body["errors"][0]["parameter"] == "since"
    status, body = await problem("GET", base + "/messages?colour=red", read)
    assert status == 400 and body["errors"][0]["parameter"] == "colour"
    status, body = await problem(
        "POST", base + "/api-keys", {**write, "Content-Type": "application/json"}, data=b"{not json"
    )
    assert status == 400
    status, body = await problem(
        "POST", base + "/api-keys", {**write, "Content-Type": "text/plain"}, data=b"name=x"
    )
    assert status == 415
    status, body = await problem(
        "POST", base + "/api-keys", write, json={"name": "x", "scope": "all"}
    )
    assert status == 422 and body["errors"][0]["field"] == "scope"
    status, body = await problem("POST", base + "/api-keys", write, json=["x"])
    assert status == 422
    status, body = await problem("POST", base + "/users", write, json={"email": "not an address"})
    assert status == 422
    status, body = await problem("GET", base + "/nothing-here", read)
    assert status == 404
    assert (
        body["detail"] == "No such path in the API; its paths are listed in /api/v1/openapi.json."
    )
    status, body = await problem("PUT", base + "/messages", read)
    assert status == 405
    assert body["detail"] == "PUT is not allowed on this path; it takes GET, HEAD."
    status, body = await problem("GET", base + "/messages/no-such-id", read)
    assert (status, body["detail"]) == (404, "No such message.")  # a route's own 404 stays
    async with http.get(base + "/api-keys", headers=read) as r:
        names = [k["name"] for k in (await r.json())["items"]]
    assert names == ["crm read", "crm write", "old"]  # nothing half-written


async def test_users_are_provisioned_and_changed(
    relay: Harness, keys: Keys, http: aiohttp.ClientSession
) -> None:
    base = relay.web_url + "/api/v1"
    write = _bearer(keys.write)
    async with http.post(
        base + "/users",
        headers=write,
        json={
            "email": "Neu@Broker.example",
            "role": "team_lead",
            "group": "north",
            "aliases": ["sales@broker.example"],
        },
    ) as r:
        assert r.status == 201, await r.text()
        made = await r.json()
    assert made["email"] == "neu@broker.example" and made["aliases"] == ["sales@broker.example"]
    agent = await users.authenticate(relay.relay.db, "neu@broker.example", made["password"])
    assert agent is not None and agent.role == Role.TEAM_LEAD and agent.group == "north"
    async with http.post(base + "/users", headers=write, json={"email": "neu@broker.example"}) as r:
        assert r.status == 409
        taken = await r.json()
    assert taken["code"] == "user.taken" and "already in use" in taken["detail"]
    async with http.post(
        base + "/users", headers=write, json={"email": "sales@broker.example"}
    ) as r:
        assert r.status == 409
        assert (await r.json())["code"] == "user.alias_of_another"
    async with http.patch(
        base + "/users/neu@broker.example", headers=write, json={"disabled": True, "group": None}
    ) as r:
        changed = await r.json()
    assert changed["disabled"] is True and changed["group"] is None
    assert changed["role"] == "team_lead"
    assert await users.authenticate(relay.relay.db, "neu@broker.example", made["password"]) is None
    await chain_all(relay.relay.db)  # a second later: the feed lists chained events
    async with http.get(base + "/events?type=user.changed&type=user.disabled", headers=write) as r:
        types = [e["type"] for e in (await r.json())["events"]]
    assert types == ["user.changed", "user.disabled"]


async def test_an_agent_principal_sees_and_acts_only_on_their_own_messages(
    relay: Harness,
) -> None:
    db = relay.relay.db
    anna = await users.add_user(db, "anna@broker.example", "correct horse battery")
    bert = await users.add_user(db, "bert@broker.example", "correct horse battery")
    mine = await seed_message(
        db,
        user_id=anna.id,
        received_at=T0,
        recipients={"p@example.com": "delivered", "q@example.com": "link_expired"},
    )
    theirs = await seed_message(
        db,
        user_id=bert.id,
        received_at=T0 + timedelta(1),
        recipients={
            "p@example.com": "delivered",
            "q@example.com": "link_expired",
            "l@example.com": "letter_held",
            "r@example.com": "released",
        },
    )
    story = await Timeline(db).message(MessageScope(everything=True), theirs)
    assert story is not None
    letters = {r.address: r.letters[0].id for r in story.recipients if r.letters}
    principal = Principal.for_user(anna.id, anna.email, Role.AGENT, None)

    async def as_anna(request: web.Request) -> Principal | None:
        return principal

    app = web.Application(middlewares=[api_problems, guard([as_anna])])
    api(relay.relay.web_parts()).register(Routes(app))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api/v1"  # type: ignore[union-attr]
    until = {"until": (utcnow() + timedelta(days=3)).isoformat()}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/messages") as r:
                assert [m["id"] for m in (await r.json())["items"]] == [mine]
            async with http.get(base + f"/messages/{theirs}") as r:
                assert r.status == 404
            async with http.get(base + f"/messages/{mine}") as r:
                assert r.status == 200
            await chain_all(db)  # a second later: the feed lists chained events
            async with http.get(base + "/events?limit=1000") as r:
                assert {e["message_id"] for e in (await r.json())["events"]} == {mine}
            async with http.get(base + f"/events?message_id={theirs}") as r:
                assert (await r.json())["events"] == []
            async with http.get(base + "/users") as r:
                assert r.status == 403
            assert Permission.VIEW_ADMIN not in principal.permissions
            # another agent's message, letters and links: 404, exactly as unknown ones
            journal_before = len(
                await Timeline(db).events(MessageScope(everything=True), limit=10_000)
            )
            bert_letters = (letters["l@example.com"], letters["r@example.com"], "nosuchletter")
            for method, path, body, targets in [
                ("POST", "/messages/{}/recipients/q@example.com/revoke", {}, (theirs, "nosuch")),
                ("POST", "/messages/{}/recipients/q@example.com/extend", until, (theirs, "x")),
                ("POST", "/letters/{}/resend", None, bert_letters),
                ("POST", "/letters/{}/release", {"reason": "asked"}, bert_letters),
                ("GET", "/letters/{}/consent.pdf", None, bert_letters),
                ("GET", "/letters/{}/original.eml", None, bert_letters),
            ]:
                answers = set()
                for target in targets:
                    async with http.request(method, base + path.format(target), json=body) as r:
                        answers.add((r.status, (await r.json())["detail"]))
                assert len(answers) == 1 and answers.pop()[0] == 404, (path, answers)
            async with http.get(base + "/webhooks") as r:
                assert r.status == 403
            assert (
                len(await Timeline(db).events(MessageScope(everything=True), limit=10_000))
                == journal_before
            )
            # her own: done
            async with http.post(
                base + f"/messages/{mine}/recipients/q@example.com/revoke", json={}
            ) as r:
                assert r.status == 200
                assert len((await r.json())["link_ids"]) == 1
            async with http.get(base + f"/messages/{mine}") as r:
                detail = await r.json()
            [link] = next(x for x in detail["recipients"] if x["address"] == "q@example.com")[
                "links"
            ]
            assert link["revoked_at"] is not None
            await chain_all(db)  # a second later: the feed lists chained events
            async with http.get(base + "/events?type=link.revoked") as r:
                [event] = (await r.json())["events"]
            assert event["data"]["actor"] == "anna@broker.example"
    finally:
        await runner.cleanup()


async def test_the_queue_lists_retries_and_deletes(database: Database, tmp_path: Path) -> None:
    """On a web-only app over the database (no worker takes the copies meanwhile)."""
    db = database
    anna = await users.add_user(db, "anna@broker.example", "correct horse battery")
    message = await seed_message(
        db,
        user_id=anna.id,
        received_at=utcnow() - timedelta(hours=1),
        recipients={
            "waits@example.com": "queued",
            "gone@example.com": "bounced",
            "fine@example.com": "delivered",
        },
    )
    desk = ApiKeyDesk(db, utcnow)
    write = _bearer((await desk.create("w", ApiKeyScope.WRITE, "t")).key)
    read = _bearer((await desk.create("r", ApiKeyScope.READ, "t")).key)
    app = web.Application(middlewares=[api_problems, guard([bearer_authenticator(desk)])])
    parts = Relay(relay_settings(tmp_path, free_port()), db=db).web_parts()  # never started
    queue = QueueDesk(db, parts.blobs, utcnow, timedelta(days=1))
    api(replace(parts, api_keys=desk, queue=queue)).register(Routes(app))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api/v1"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/queue", headers=read) as r:
                items = {i["recipient"]: i for i in (await r.json())["items"]}
            assert set(items) == {"waits@example.com", "gone@example.com"}
            assert items["gone@example.com"]["status"] == "bounced"
            assert items["gone@example.com"]["message_id"] == message
            async with http.get(base + "/queue?status=bounced", headers=read) as r:
                assert [i["recipient"] for i in (await r.json())["items"]] == ["gone@example.com"]
            async with http.get(base + "/queue?status=delivered", headers=read) as r:
                assert r.status == 400
            gone, waits = items["gone@example.com"]["id"], items["waits@example.com"]["id"]
            async with http.post(base + f"/queue/{gone}/retry", headers=read) as r:
                assert r.status == 403
            # the seeded copy names bytes the store never had, as after the sweep deleted them
            async with http.post(base + f"/queue/{gone}/retry", headers=write) as r:
                assert r.status == 409
                assert "no longer kept" in (await r.json())["detail"]
            kept = await parts.blobs.put(b"Subject: kept\r\n\r\nstill here\r\n")
            async with db.transaction() as session:
                await session.execute(update(Delivery).where(Delivery.id == gone).values(blob=kept))
            async with http.post(base + f"/queue/{gone}/retry", headers=write) as r:
                assert r.status == 204
            async with http.delete(base + f"/queue/{waits}", headers=write) as r:
                assert r.status == 204
            async with http.delete(base + f"/queue/{waits}", headers=write) as r:
                assert r.status == 409
                assert "deleted" in (await r.json())["detail"]
            async with http.get(base + "/queue", headers=read) as r:
                items = {i["recipient"]: i for i in (await r.json())["items"]}
            assert set(items) == {"gone@example.com"}
            assert items["gone@example.com"]["status"] == "queued"
            async with http.get(base + f"/messages/{message}", headers=read) as r:
                states = {x["address"]: x["state"] for x in (await r.json())["recipients"]}
            assert states == {
                "waits@example.com": "deleted",
                "gone@example.com": "queued",
                "fine@example.com": "delivered",
            }
            await chain_all(db)  # a second later: the feed lists chained events
            async with http.get(
                base + "/events?type=delivery.retried&type=delivery.deleted", headers=read
            ) as r:
                events = [(e["type"], e["data"]["recipient"]) for e in (await r.json())["events"]]
            assert events == [
                ("delivery.retried", "gone@example.com"),
                ("delivery.deleted", "waits@example.com"),
            ]
    finally:
        await runner.cleanup()
