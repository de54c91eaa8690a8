"""The admin's user pages beyond adding (delete with confirmation, password reset, aliases) and
every user's own account page (notice mails, own password), over real HTTP on both databases.
Every refusal leaves the users and the journal as they were."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from gateway import users
from gateway.console import totp
from gateway.store.models import Event
from tests.conftest import PASSWORD
from tests.console.client import ConsoleClient
from tests.console.work_world import ADMIN, AGENT, AUDITOR, OTHER_AGENT, World, world_of
from tests.letter_site import LetterSite

USERS = "/console/admin/users"
SECRET = re.compile(r'<code class="secret-value">([^<]+)</code>')


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async for made in world_of(site):
        yield made


def visible(page: str) -> str:
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", page).split()))


async def journal(world: World, type_: str) -> list[dict[str, object]]:
    async with world.site.relay.db.transaction() as session:
        rows = (await session.scalars(select(Event).where(Event.type == type_))).all()
        return [dict(e.data) for e in rows]


async def test_deleting_a_user_asks_first_then_ends_their_access_and_keeps_their_messages(
    world: World,
) -> None:
    admin, other = world.consoles[ADMIN], world.consoles[OTHER_AGENT]
    csrf = await world.csrf(ADMIN)
    listing = await admin.get(USERS)
    assert f'href="{USERS}/delete?email=other%40broker.example"' in listing.text

    confirm = await admin.get(f"{USERS}/delete?email=Other%40Broker.Example")
    assert confirm.status == 200
    shown = visible(confirm.text)
    assert "Delete this user?" in shown and "Their messages, letters, consents" in shown
    assert (await other.get("/console/")).status == 200, "a GET deleted nothing"

    unconfirmed = await admin.post(f"{USERS}/delete", {"csrf": csrf, "email": OTHER_AGENT})
    assert unconfirmed.status == 400 and "confirmation page" in visible(unconfirmed.text)
    assert await journal(world, "user.deleted") == []

    done = await admin.post(
        f"{USERS}/delete", {"csrf": csrf, "email": OTHER_AGENT, "confirm": OTHER_AGENT}
    )
    assert done.status == 303 and done.location == f"{USERS}?done=user_deleted"
    assert (await other.get("/console/")).status == 303, "their session ended"
    assert OTHER_AGENT not in visible((await admin.get(USERS)).text)
    story = await admin.get(f"/console/messages/{world.others_message}")
    assert story.status == 200 and "Ein anderes Haus" in visible(story.text)
    assert await journal(world, "user.deleted") == [
        {"email": OTHER_AGENT, "aliases": [], "sessions": 1, "by": ADMIN}
    ]
    async with ConsoleClient(world.url) as again:
        assert (await again.sign_in(OTHER_AGENT, PASSWORD)).status == 401
    gone = await admin.post(
        f"{USERS}/delete", {"csrf": csrf, "email": OTHER_AGENT, "confirm": OTHER_AGENT}
    )
    assert gone.status == 404


async def test_unknown_users_are_not_found_and_oneself_and_the_last_admin_are_refused(
    world: World,
) -> None:
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN)
    before = await world.journal_size()
    nobody = "nobody@broker.example"
    assert (await admin.get(f"{USERS}/delete?email={nobody}")).status == 404
    for path, form in (
        ("/delete", {"email": nobody, "confirm": nobody}),
        ("/password", {"email": nobody}),
        ("/aliases", {"email": nobody, "action": "add", "address": "x@broker.example"}),
        ("/aliases", {"email": AGENT, "action": "remove", "address": "x@broker.example"}),
        ("/change", {"email": nobody, "action": "disable"}),
    ):
        answer = await admin.post(USERS + path, {"csrf": csrf, **form})
        assert answer.status == 404, (path, form, answer.status)
        assert "no user" in answer.text or "not an alias" in answer.text

    mine = await admin.get(f"{USERS}/delete?email={ADMIN}")
    assert mine.status == 200 and "cannot delete your own account" in visible(mine.text)
    assert 'action="/console/admin/users/delete"' not in mine.text
    for path, form in (
        ("/delete", {"email": ADMIN, "confirm": ADMIN}),
        ("/change", {"email": ADMIN, "action": "disable"}),
        ("/change", {"email": ADMIN, "action": "save", "role": "auditor"}),
    ):
        answer = await admin.post(USERS + path, {"csrf": csrf, **form})
        assert answer.status == 409, (path, form, answer.status)
    assert await world.journal_size() == before
    assert (await admin.get("/console/admin")).status == 200, "still an admin, still signed in"


async def test_posts_without_the_csrf_token_change_nothing(world: World) -> None:
    before = await world.journal_size()
    for who, path, form in (
        (ADMIN, f"{USERS}/delete", {"email": AGENT, "confirm": AGENT}),
        (ADMIN, f"{USERS}/password", {"email": AGENT}),
        (ADMIN, f"{USERS}/aliases", {"email": AGENT, "action": "add", "address": "d@b.example"}),
        (ADMIN, f"{USERS}/totp-off", {"email": AGENT}),
        (AGENT, "/console/account/notices", {"notices": "1"}),
        (AGENT, "/console/account/password", {"current": PASSWORD, "new": "x" * 12}),
    ):
        answer = await world.consoles[who].post(path, {**form, "repeat": "x" * 12})
        assert answer.status == 403, (path, answer.status)
    assert await world.journal_size() == before
    assert (await users.find_user(world.site.relay.db, AGENT))[0].deleted_at is None


async def test_a_reset_password_is_shown_once_and_signs_the_user_out(world: World) -> None:
    admin, agent = world.consoles[ADMIN], world.consoles[AGENT]
    csrf = await world.csrf(ADMIN)
    answer = await admin.post(f"{USERS}/password", {"csrf": csrf, "email": AGENT})
    assert answer.status == 200
    [password] = SECRET.findall(answer.text)
    password = html.unescape(password)
    assert f"New password for {AGENT}" in visible(answer.text)
    assert password not in (await admin.get(USERS)).text
    assert (await agent.get("/console/")).status == 303
    assert (await agent.sign_in(AGENT, PASSWORD)).status == 401
    assert (await agent.sign_in(AGENT, password)).status == 303
    [event] = await journal(world, "user.password_reset")
    assert event == {"email": AGENT, "sessions": 1, "by": ADMIN}
    async with world.site.relay.db.transaction() as session:
        assert password not in str((await session.scalars(select(Event.data))).all())


async def test_an_admin_turns_off_the_totp_of_someone_who_lost_their_phone(
    world: World,
) -> None:
    admin = world.consoles[ADMIN]
    db = world.site.relay.db
    csrf = await world.csrf(ADMIN)
    button = 'action="/console/admin/users/totp-off"'
    assert button not in (await admin.get(USERS)).text, "offered only to users who have it"
    await totp.enable(db, AGENT)
    assert (await admin.get(USERS)).text.count(button) == 1

    answer = await admin.post(f"{USERS}/totp-off", {"csrf": csrf, "email": AGENT.upper()})
    assert answer.status == 303 and answer.location == f"{USERS}?done=totp_off"
    assert "TOTP turned off" in visible((await admin.get(answer.location)).text)
    assert (await users.find_user(db, AGENT))[0].totp_secret is None
    assert await journal(world, "user.totp_disabled") == [{"email": AGENT, "by": ADMIN}]
    async with ConsoleClient(world.url) as again:
        assert (await again.sign_in(AGENT, PASSWORD)).status == 303, "no code asked"

    await totp.enable(db, ADMIN)
    before = await world.journal_size()
    own = await admin.post(f"{USERS}/totp-off", {"csrf": csrf, "email": ADMIN})
    assert own.status == 409 and "Ask another administrator" in visible(own.text)
    assert (await users.find_user(db, ADMIN))[0].totp_secret is not None
    unknown = await admin.post(f"{USERS}/totp-off", {"csrf": csrf, "email": "nobody@b.example"})
    assert unknown.status == 404
    agent = await world.consoles[AGENT].post(f"{USERS}/totp-off", {"csrf": csrf, "email": ADMIN})
    assert agent.status in (403, 404)
    assert await world.journal_size() == before


async def test_an_admin_adds_and_removes_aliases(world: World) -> None:
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN)
    form = {"csrf": csrf, "email": AGENT, "action": "add", "address": "Desk@Broker.Example"}
    added = await admin.post(f"{USERS}/aliases", form)
    assert added.status == 303 and added.location == f"{USERS}?done=alias_added"
    listing = visible((await admin.get(USERS)).text)
    assert "desk@broker.example" in listing
    again = await admin.post(f"{USERS}/aliases", form)
    assert again.status == 409 and "already an alias" in visible(again.text)
    bad = await admin.post(f"{USERS}/aliases", {**form, "address": "not an address"})
    assert bad.status == 400
    removed = await admin.post(
        f"{USERS}/aliases", {**form, "action": "remove", "address": "desk@broker.example"}
    )
    assert removed.status == 303
    assert "desk@broker.example" not in visible((await admin.get(USERS)).text)
    assert [e["alias"] for e in await journal(world, "user.alias_removed")] == [
        "desk@broker.example"
    ]


async def test_every_role_sets_their_own_notice_mails(world: World) -> None:
    db, settings = world.site.relay.db, world.site.relay.settings
    for who in (AGENT, AUDITOR, ADMIN):
        console = world.consoles[who]
        page = await console.get("/console/account")
        assert page.status == 200 and "Mails from the relay" in visible(page.text)
        csrf = await world.csrf(who, "/console/account")
        saved = await console.post(
            "/console/account/notices", {"csrf": csrf, "notices": "1", "first_download": "yes"}
        )
        assert saved.status == 303 and saved.location == "/console/account?done=notices_saved"
        prefs = await users.notifications(db, who, settings)
        assert prefs.first_download and not prefs.expiry_warning
        page = await console.get("/console/account?done=notices_saved")
        assert "Your mail choices are saved." in visible(page.text)
        assert re.search(r'name="first_download" type="checkbox" value="yes" checked', page.text)
        assert not re.search(
            r'name="expiry_warning" type="checkbox" value="yes" checked', page.text
        )
    other = await users.notifications(db, OTHER_AGENT, settings)
    assert other == await users.notifications(db, OTHER_AGENT, settings)
    csrf = await world.csrf(AGENT, "/console/account")
    incomplete = await world.consoles[AGENT].post(
        "/console/account/notices", {"csrf": csrf, "email": OTHER_AGENT}
    )
    assert incomplete.status == 400
    [one_change] = [e for e in await journal(world, "user.notices_changed") if e["email"] == AGENT]
    assert one_change["first_download"] is True


async def test_changing_ones_own_password_needs_the_current_one_and_is_throttled(
    world: World,
) -> None:
    agent = world.consoles[AGENT]
    path = "/console/account/password"
    async with ConsoleClient(world.url) as elsewhere:
        assert (await elsewhere.sign_in(AGENT, PASSWORD)).status == 303
        csrf = await world.csrf(AGENT, "/console/account")
        new = "a brand new password"
        for form, status, says in (
            ({"current": PASSWORD, "new": new, "repeat": new + "x"}, 400, "differ"),
            ({"current": PASSWORD, "new": "short", "repeat": "short"}, 400, "10 characters"),
            ({"current": "", "new": new, "repeat": new}, 400, "current and your new"),
            ({"current": "wrong password", "new": new, "repeat": new}, 400, "not right"),
        ):
            answer = await agent.post(path, {"csrf": csrf, **form})
            assert answer.status == status and says in visible(answer.text), form
        assert await users.authenticate(world.site.relay.db, AGENT, PASSWORD) is not None

        done = await agent.post(
            path, {"csrf": csrf, "current": PASSWORD, "new": new, "repeat": new}
        )
        assert done.status == 303 and done.location == "/console/account?done=password_changed"
        assert (await agent.get("/console/account")).status == 200, "this session stays"
        assert (await elsewhere.get("/console/")).status == 303, "the other one ended"
        assert await users.authenticate(world.site.relay.db, AGENT, new) is not None

    # as at sign-in: the address where the agent signed in is trusted with their account's
    # budget, so its own bucket is what stops guessing in a session left open
    limit = world.site.relay.settings.smtp.max_auth_failures_per_ip
    statuses = []
    while 429 not in statuses and len(statuses) <= limit:
        form = {"csrf": csrf, "current": "wrong password", "new": new, "repeat": new}
        statuses.append((await agent.post(path, form)).status)
    assert statuses[-1] == 429 and set(statuses[:-1]) == {400}
    # the wrong current password above counted too: one fewer try was left
    assert len(statuses) == limit
    throttled = await agent.post(path, {"csrf": csrf, "current": new, "new": new, "repeat": new})
    assert throttled.status == 429 and throttled.headers["Retry-After"]
