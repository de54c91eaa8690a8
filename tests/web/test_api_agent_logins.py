"""The API's /users/{email}/upstream-login: set, show and clear an agent's own login, the
password never in an answer, the journal or the log; through a real relay on both databases."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from sqlalchemy import select

from gateway.console.api_keys import ApiKeyDesk
from gateway.store.models import AgentLogin, ApiKeyScope, Event, utcnow
from tests.conftest import AGENT, Harness
from tests.web.test_api_users import call

SECRET = "hoster secret 7"
LOGIN = {"url": "smtps://mail.webhoster.example", "username": "anna", "password": SECRET}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def key(relay: Harness, scope: ApiKeyScope) -> dict[str, str]:
    made = await ApiKeyDesk(relay.relay.db, utcnow).create(f"crm-{scope}", scope, "test")
    return {"Authorization": f"Bearer {made.key}"}


async def test_a_login_is_set_shown_and_cleared_and_the_password_never_comes_back(
    relay: Harness, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    write, read = await key(relay, ApiKeyScope.WRITE), await key(relay, ApiKeyScope.READ)
    url = f"{relay.web_url}/api/v1/users/{AGENT}/upstream-login"

    assert (await call(http, "GET", url, read))[0] == 404
    assert (await call(http, "PUT", url, read, json=LOGIN))[0] == 403
    status, body = await call(http, "PUT", url, write, json=LOGIN)
    assert status == 200, body
    assert set(body) == {"email", "url", "username", "created_at", "updated_at"}
    assert (body["url"], body["username"]) == ("smtps://mail.webhoster.example", "anna")
    status, shown = await call(http, "GET", url, read)
    assert status == 200 and shown == body

    async with relay.relay.db.transaction() as session:
        [row] = (await session.scalars(select(AgentLogin))).all()
        events = (await session.scalars(select(Event))).all()
    assert SECRET.encode() not in row.ciphertext
    assert any(e.type == "user.upstream_login_set" for e in events)
    assert SECRET not in repr([e.data for e in events])
    assert SECRET not in caplog.text

    assert (await call(http, "DELETE", url, write))[0] == 204
    assert (await call(http, "DELETE", url, write))[0] == 404
    assert (await call(http, "GET", url, read))[0] == 404


async def test_bad_logins_are_refused_and_nothing_is_stored(
    relay: Harness, http: aiohttp.ClientSession
) -> None:
    write = await key(relay, ApiKeyScope.WRITE)
    url = f"{relay.web_url}/api/v1/users/{AGENT}/upstream-login"
    for body, detail in (
        ({**LOGIN, "url": "http://mail.example"}, "'field': 'url'"),
        ({**LOGIN, "url": "smtp://anna:pw@mail.example"}, "'field': 'url'"),
        ({**LOGIN, "url": "smtp://mail.example:70000"}, "'field': 'url'"),
        ({**LOGIN, "username": " "}, "'field': 'username'"),
        ({**LOGIN, "password": ""}, "'field': 'password'"),
        ({**LOGIN, "extra": 1}, "extra"),
        ({"url": LOGIN["url"], "username": "anna"}, "password"),
    ):
        status, problem = await call(http, "PUT", url, write, json=body)
        assert status == 422, body
        assert detail in repr(problem), problem
        assert SECRET not in repr(problem)
    for who in ("nobody@broker.example", "not-an-address"):
        nobody = f"{relay.web_url}/api/v1/users/{who}/upstream-login"
        assert (await call(http, "PUT", nobody, write, json=LOGIN))[0] == 404
        assert (await call(http, "GET", nobody, write))[0] == 404
    async with relay.relay.db.transaction() as session:
        assert (await session.scalars(select(AgentLogin))).all() == []
        types = (await session.scalars(select(Event.type))).all()
    assert "user.upstream_login_set" not in types
