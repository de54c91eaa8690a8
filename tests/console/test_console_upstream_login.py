"""The own mail host login in the console: an agent sets and clears theirs on My account, an
admin anyone's on the users page; the password is never on a page, in the journal or the log,
and refusals change nothing. Over real HTTP on both databases."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from gateway.store.models import AgentLogin
from tests.console.client import speaking
from tests.console.test_console_users_admin import journal, visible
from tests.console.work_world import ADMIN, AGENT, AUDITOR, OTHER_AGENT, World, world_of
from tests.letter_site import LetterSite

ACCOUNT = "/console/account"
USERS = "/console/admin/users"
SECRET = "hoster secret 7 with spaces "
FORM = {"action": "set", "url": "smtp://mail.webhoster.example:587", "username": "anna"}


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async for made in world_of(site):
        yield made


async def logins(world: World) -> dict[int, tuple[str, str, bytes]]:
    async with world.site.relay.db.transaction() as session:
        rows = (await session.scalars(select(AgentLogin))).all()
    return {r.user_id: (r.url, r.username, r.ciphertext) for r in rows}


async def test_an_agent_sets_and_clears_their_own_login(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = world.consoles[AGENT]
    page = await agent.get(ACCOUNT)
    assert page.status == 200 and "Own mail host login" in visible(page.text)
    assert "None: the mail leaves through the relay's own server." in visible(page.text)
    csrf = await world.csrf(AGENT, ACCOUNT)

    saved = await agent.post(
        ACCOUNT + "/upstream-login", {"csrf": csrf, **FORM, "password": SECRET}
    )
    assert saved.status == 303 and saved.location == f"{ACCOUNT}?done=login_saved"
    shown = await agent.get(f"{ACCOUNT}?done=login_saved")
    assert "Your mail host login is saved" in visible(shown.text)
    assert "smtp://mail.webhoster.example:587" in shown.text and "anna" in shown.text
    assert SECRET.strip() not in shown.text
    assert 'name="password" type="password" required maxlength="1000" autocomplete' in shown.text
    [(url, username, sealed)] = (await logins(world)).values()
    assert (url, username) == ("smtp://mail.webhoster.example:587", "anna")
    assert SECRET.encode() not in sealed
    [event] = await journal(world, "user.upstream_login_set")
    assert event == {"email": AGENT, "url": url, "username": "anna", "by": AGENT}
    opened = await world.site.relay.agent_logins.open(next(iter(await logins(world))))
    assert opened is not None and opened.password == SECRET, "spaces are kept"

    cleared = await agent.post(ACCOUNT + "/upstream-login", {"csrf": csrf, "action": "clear"})
    assert cleared.status == 303 and cleared.location == f"{ACCOUNT}?done=login_cleared"
    assert await logins(world) == {}
    assert len(await journal(world, "user.upstream_login_cleared")) == 1
    assert SECRET.strip() not in caplog.text


async def test_refused_forms_change_nothing_and_name_the_problem(world: World) -> None:
    agent = world.consoles[AGENT]
    csrf = await world.csrf(AGENT, ACCOUNT)
    before = await world.journal_size()
    path = ACCOUNT + "/upstream-login"
    for form, status, says in (
        ({**FORM, "password": ""}, 400, "Please enter the server, the username and the password."),
        ({**FORM, "url": "http://mail.example", "password": "x"}, 400, "must be smtp://HOST"),
        ({**FORM, "url": "smtp://a:b@mail.example", "password": "x"}, 400, "their own fields"),
        ({**FORM, "action": "other", "password": "x"}, 400, "The form was not complete"),
    ):
        answer = await agent.post(path, {"csrf": csrf, **form})
        assert answer.status == status, form
        assert says in visible(answer.text), visible(answer.text)
        assert 'value="x"' not in answer.text, "a typed password is not sent back"
    slip = {"csrf": csrf, **FORM, "url": "http://mail.example", "password": "x"}
    german = await agent.post(path, slip, **speaking("de"))
    assert german.status == 400
    assert (
        "Nicht gespeichert: Der Server muss als smtp://HOST[:PORT] oder smtps://HOST[:PORT]"
        " angegeben werden." in visible(german.text)
    )
    # what was typed stays in the form, so the one slip is mended, not all typed again
    assert 'name="url" type="text"' in german.text and 'value="http://mail.example"' in german.text
    assert 'value="anna"' in german.text and 'value="x"' not in german.text
    # without the CSRF token, nothing at all
    assert (await agent.post(path, {**FORM, "password": SECRET})).status == 403
    admin_path = USERS + "/upstream-login"
    forged = await world.consoles[ADMIN].post(
        admin_path, {**FORM, "email": AGENT, "password": SECRET}
    )
    assert forged.status == 403
    # an auditor reads the users page but may not change a login
    auditor_csrf = await world.csrf(AUDITOR)
    denied = await world.consoles[AUDITOR].post(
        admin_path, {"csrf": auditor_csrf, **FORM, "email": AGENT, "password": SECRET}
    )
    assert denied.status == 403
    assert await world.journal_size() == before and await logins(world) == {}


async def test_an_admin_sets_and_clears_another_users_login(world: World) -> None:
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN)
    path = USERS + "/upstream-login"
    nobody = await admin.post(
        path, {"csrf": csrf, **FORM, "email": "nobody@broker.example", "password": SECRET}
    )
    assert nobody.status == 404 and "no user nobody@broker.example" in visible(nobody.text)
    slip = await admin.post(
        path,
        {
            "csrf": csrf,
            **FORM,
            "url": "smtp://a:b@mail.example",
            "email": OTHER_AGENT,
            "password": "x",
        },
    )
    assert slip.status == 400 and "their own fields" in visible(slip.text)
    # typed back into that user's form only; no password is sent back, not even from the URL
    assert slip.text.count('value="smtp://mail.example"') == 1 and ":b@" not in slip.text
    assert slip.text.count('value="anna"') == 1 and 'value="x"' not in slip.text

    saved = await admin.post(path, {"csrf": csrf, **FORM, "email": OTHER_AGENT, "password": SECRET})
    assert saved.status == 303 and saved.location == f"{USERS}?done=user_login_saved"
    listing = await admin.get(USERS)
    assert "smtp://mail.webhoster.example:587" in listing.text
    assert SECRET.strip() not in listing.text
    [event] = await journal(world, "user.upstream_login_set")
    assert event["email"] == OTHER_AGENT and event["by"] == ADMIN
    # the agent sees it on their own page; another agent does not
    assert "mail.webhoster.example" in (await world.consoles[OTHER_AGENT].get(ACCOUNT)).text
    assert "mail.webhoster.example" not in (await world.consoles[AGENT].get(ACCOUNT)).text

    cleared = await admin.post(path, {"csrf": csrf, "action": "clear", "email": OTHER_AGENT})
    assert cleared.status == 303 and await logins(world) == {}
