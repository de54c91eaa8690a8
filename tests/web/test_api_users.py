"""The API's user operations beyond create and change: delete, password reset and aliases,
with their refusals, through a real relay on both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from gateway import users
from gateway.console.api_keys import ApiKeyDesk
from gateway.store.models import ApiKeyScope, Event, Message, Role, utcnow
from tests.conftest import AGENT, PASSWORD, Harness, make_message

ADMIN = "it@broker.example"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def write(relay: Harness) -> dict[str, str]:
    made = await ApiKeyDesk(relay.relay.db, utcnow).create("crm", ApiKeyScope.WRITE, "test")
    return {"Authorization": f"Bearer {made.key}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, **kw) as r:
        body = await r.json() if r.content_type.endswith("json") else None
        return r.status, body


async def test_a_user_is_deleted_and_their_messages_stay(
    relay: Harness, http: aiohttp.ClientSession, write: dict[str, str]
) -> None:
    base = relay.web_url + "/api/v1/users"
    db = relay.relay.db
    await users.add_user(db, ADMIN, PASSWORD, role=Role.ADMIN)
    await relay.send(make_message())

    status, problem = await call(http, "DELETE", f"{base}/nobody@broker.example", write)
    assert status == 404 and problem["status"] == 404
    assert (await call(http, "DELETE", f"{base}/{AGENT}", write))[0] == 204
    assert (await call(http, "DELETE", f"{base}/{AGENT}", write))[0] == 404
    status, listing = await call(http, "GET", base, write)
    assert [u["email"] for u in listing["items"]] == [ADMIN]
    async with db.transaction() as session:
        assert len((await session.scalars(select(Message))).all()) == 1
        [event] = (await session.scalars(select(Event).where(Event.type == "user.deleted"))).all()
    assert event.data["by"] == "api key crm" and event.data["email"] == AGENT
    status, problem = await call(http, "POST", base, write, json={"email": AGENT})
    assert status == 409 and "reserved" in problem["detail"]

    # the last enabled admin is neither deleted, disabled nor demoted
    before = await call(http, "GET", base, write)
    for method, body in (
        ("DELETE", None),
        ("PATCH", {"disabled": True}),
        ("PATCH", {"role": "agent"}),
    ):
        status, problem = await call(http, method, f"{base}/{ADMIN}", write, json=body)
        assert status == 409 and "last enabled admin" in problem["detail"], (method, body)
    assert await call(http, "GET", base, write) == before


async def test_a_password_is_reset_once_and_aliases_come_and_go(
    relay: Harness, http: aiohttp.ClientSession, write: dict[str, str]
) -> None:
    base = relay.web_url + "/api/v1/users"
    db = relay.relay.db
    status, body = await call(http, "POST", f"{base}/Agent@Broker.Example/password", write)
    assert status == 200 and body["email"] == AGENT
    assert await users.authenticate(db, AGENT, PASSWORD) is None
    assert await users.authenticate(db, AGENT, body["password"]) is not None
    assert (await call(http, "POST", f"{base}/nobody@broker.example/password", write))[0] == 404
    assert (await call(http, "POST", f"{base}/not-an-address/password", write))[0] == 404

    url = f"{base}/{AGENT}/aliases"
    status, user = await call(http, "POST", url, write, json={"address": "desk@broker.example"})
    assert status == 201 and "desk@broker.example" in user["aliases"]
    status, problem = await call(http, "POST", url, write, json={"address": "desk@broker.example"})
    assert status == 409 and "already an alias" in problem["detail"]
    status, problem = await call(http, "POST", url, write, json={"address": "nope"})
    assert status == 422 and problem["status"] == 422
    status, _ = await call(
        http, "POST", f"{base}/nobody@broker.example/aliases", write, json={"address": "a@b.de"}
    )
    assert status == 404
    assert (await call(http, "DELETE", f"{url}/desk@broker.example", write))[0] == 204
    assert (await call(http, "DELETE", f"{url}/desk@broker.example", write))[0] == 404
    _, listing = await call(http, "GET", base, write)
    [agent] = [u for u in listing["items"] if u["email"] == AGENT]
    assert "desk@broker.example" not in agent["aliases"]
