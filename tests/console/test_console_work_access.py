"""Who may open and post to every console route: each role, another agent, a team lead of the
group, an auditor, an admin and no one. The routes come from the app's own table, so a console
route added without a case here fails the test. Every refusal leaves the journal as it was."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qs

import pytest
from aiohttp.web_urldispatcher import AbstractRoute
from sqlalchemy import select

from gateway.store.models import ApiKeyScope, Delivery, DeliveryStatus
from tests.console.client import Answer
from tests.console.work_world import (
    ADMIN,
    AGENT,
    AUDITOR,
    LEAD,
    OTHER_AGENT,
    World,
    get_bytes,
    world_of,
)
from tests.letter_site import LetterSite
from tests.queue_wait import queue_idle
from web.app import create_app
from web.guard import RULES, Audience

SIGNED_IN = (AGENT, OTHER_AGENT, LEAD, AUDITOR, ADMIN)
NOBODY = "nobody"


@dataclass(frozen=True)
class Case:
    """What each caller gets. `allowed` is the answer for whoever may use the route (a
    refusal of the desk's where a POST would change something: the matrix changes nothing);
    `others`, the answer for a signed-in user the route is not for."""

    # "mine" (a message of the agent's), "all" (everyone's own view), "admin" (admins, and
    # auditors to read), "manage" (admins only, even to read)
    kind: str
    allowed: int
    post: bool = False
    covered_elsewhere: str = ""


# every console route: (method, path) -> its case; a missing route fails the test
CASES: dict[tuple[str, str], Case] = {
    ("GET", "/console/"): Case("all", 200),
    ("GET", "/console"): Case("all", 303),  # on to /console/
    ("POST", "/console/logout"): Case("all", 303, post=True, covered_elsewhere="test_sessions"),
    ("POST", "/console/logout-everywhere"): Case(
        "all", 303, post=True, covered_elsewhere="test_sessions"
    ),
    ("GET", "/console/messages"): Case("all", 200),
    ("GET", "/console/letters"): Case("all", 200),
    ("GET", "/console/messages/{id}"): Case("mine", 200),
    # a reason longer than 500 characters: refused by the desk, nothing written
    ("POST", "/console/messages/{id}/revoke"): Case("mine", 400, post=True),
    ("POST", "/console/messages/{id}/extend"): Case("mine", 400, post=True),  # no date
    # the letter was consented to: neither re-sent nor released again
    ("POST", "/console/messages/{id}/letters/{letter}/resend"): Case("mine", 409, post=True),
    # the reason is too long: refused before the state is even looked at
    ("POST", "/console/messages/{id}/letters/{letter}/release"): Case("mine", 400, post=True),
    ("GET", "/console/messages/{id}/letters/{letter}/preview"): Case("mine", 200),
    ("GET", "/console/messages/{id}/links/{link}/preview"): Case("mine", 200),
    ("GET", "/console/messages/{id}/letters/{letter}/consent.pdf"): Case("mine", 200),
    ("GET", "/console/messages/{id}/letters/{letter}/original.eml"): Case("mine", 200),
    ("GET", "/console/admin"): Case("admin", 200),
    ("GET", "/console/admin/users"): Case("admin", 200),
    ("POST", "/console/admin/users"): Case("admin", 400, post=True),  # no role
    ("POST", "/console/admin/users/change"): Case("admin", 400, post=True),  # no action
    ("GET", "/console/admin/users/delete"): Case("manage", 404),  # no such user
    ("POST", "/console/admin/users/delete"): Case("admin", 400, post=True),  # not confirmed
    ("POST", "/console/admin/users/password"): Case("admin", 400, post=True),  # no address
    ("POST", "/console/admin/users/aliases"): Case("admin", 400, post=True),  # no action
    ("POST", "/console/admin/users/totp-off"): Case("admin", 400, post=True),  # no address
    ("POST", "/console/admin/users/upstream-login"): Case("admin", 400, post=True),
    ("GET", "/console/account"): Case("all", 200),
    # no marker field: no choice made, nothing stored
    ("POST", "/console/account/notices"): Case("all", 400, post=True),
    # no current password: refused before any check
    ("POST", "/console/account/password"): Case("all", 400, post=True),
    ("POST", "/console/account/upstream-login"): Case("all", 400, post=True),
    ("GET", "/console/admin/queue"): Case("admin", 200),
    # a delivered copy: nothing to retry, not queued to delete
    ("POST", "/console/admin/queue/{id}/retry"): Case("admin", 409, post=True),
    ("POST", "/console/admin/queue/{id}/delete"): Case("admin", 409, post=True),
    ("GET", "/console/admin/webhooks"): Case("admin", 200),
    ("POST", "/console/admin/webhooks"): Case("admin", 400, post=True),  # no URL
    ("GET", "/console/admin/webhooks/{id}"): Case("admin", 200),
    ("POST", "/console/admin/webhooks/{id}/enable"): Case("admin", 404, post=True),
    ("POST", "/console/admin/webhooks/{id}/disable"): Case("admin", 404, post=True),
    ("POST", "/console/admin/webhooks/{id}/replay"): Case("admin", 400, post=True),  # no seq
    # no times given: refused before anything is looked up
    ("POST", "/console/admin/webhooks/{id}/replay-range"): Case("admin", 400, post=True),
    ("POST", "/console/admin/webhooks/{id}/edit"): Case("admin", 404, post=True),
    ("POST", "/console/admin/webhooks/{id}/rotate-secret"): Case("admin", 404, post=True),
    ("POST", "/console/admin/webhooks/{id}/test"): Case("admin", 404, post=True),
    ("GET", "/console/admin/keys"): Case("admin", 200),
    ("POST", "/console/admin/keys"): Case("admin", 400, post=True),  # no scope
    ("POST", "/console/admin/keys/{id}/revoke"): Case("admin", 409, post=True),  # no such key
    ("GET", "/console/admin/journal"): Case("admin", 200),
    ("GET", "/console/admin/policy"): Case("admin", 200),
    ("GET", "/console/admin/texts"): Case("admin", 200),
    ("GET", "/console/admin/dkim"): Case("admin", 200),
    ("GET", "/console/{rest}"): Case("all", 404),  # any other path: the console's own 404
}

MINE_CAN = {AGENT, LEAD, AUDITOR, ADMIN}  # the agent, their team lead, the two who see all


def expected(case: Case, who: str) -> int:
    if who == NOBODY:
        return 303
    if case.kind == "all":
        return case.allowed
    if case.kind == "manage":
        return case.allowed if who == ADMIN else 403
    if case.kind == "admin":
        if who == ADMIN or (who == AUDITOR and not case.post):
            return case.allowed
        return 403
    if case.post and who == AUDITOR:
        return 403
    return case.allowed if who in MINE_CAN else 404


def console_routes(world: World) -> list[tuple[str, str]]:
    app = create_app(world.site.relay.web_parts())
    found = set()
    for route, rule in app[RULES].items():
        assert isinstance(route, AbstractRoute)
        if rule.audience is Audience.CONSOLE and route.method != "HEAD":
            assert route.resource is not None
            found.add((route.method, route.resource.canonical))
    return sorted(found)


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async for made in world_of(site):
        yield made


async def test_every_console_route_answers_each_caller_as_its_rule_says(world: World) -> None:
    routes = console_routes(world)
    missing = [route for route in routes if route not in CASES]
    assert missing == [], f"console routes without an access case: {missing}"
    assert sorted(CASES) == routes, "a case for a route that no longer exists"

    consent = await world.site.consent(world.letter_token)
    assert consent.status == 303
    endpoint = await world.site.relay.webhooks.create(
        "http://127.0.0.1:9/hook", allow_private=True, by="test"
    )
    async with world.site.relay.db.transaction() as session:
        delivered = await session.scalar(
            select(Delivery.id).where(Delivery.status == DeliveryStatus.DELIVERED).limit(1)
        )
    tokens = {who: await world.csrf(who) for who in SIGNED_IN}
    await queue_idle(world.site.relay.db)  # the released copy's delivery is journaled too
    before = await world.journal_size()

    def path_for(template: str) -> str:
        message = world.link_message if "{link}" in template else world.letter_message
        if template.startswith("/console/admin/queue/"):
            ident = str(delivered)
        elif template.startswith("/console/admin/webhooks/{id}/") and "replay" not in template:
            ident = "no-such-endpoint"
        elif template.startswith("/console/admin/webhooks/"):
            ident = endpoint.endpoint.id
        elif template.startswith("/console/admin/keys/"):
            ident = "no-such-key"
        else:
            ident = message
        return (
            template.replace("{id}", ident)
            .replace("{letter}", world.letter_id)
            .replace("{link}", world.link_id)
            .replace("{rest}", "no-such-page/at-all")
        )

    answers: list[tuple[str, str, str, int, int]] = []
    for method, template in routes:
        case = CASES[(method, template)]
        path = path_for(template)
        for who in (*SIGNED_IN, NOBODY):
            if case.covered_elsewhere and who != NOBODY:
                continue
            console = world.consoles[who]
            if method == "GET" and path.endswith((".pdf", ".eml")):
                status, body, headers = await get_bytes(console, path)
                answer = Answer(status, body.decode("utf-8", "replace"), headers)
            elif method == "GET":
                answer = await console.get(path)
            else:
                form = {"csrf": tokens.get(who, ""), "reason": "x" * 600, "recipient": ""}
                if template.endswith(("/revoke", "/extend")) and "{letter}" not in template:
                    form["recipient"] = "paula@example.com"
                answer = await console.post(path, form)
            want = expected(case, who)
            answers.append((who, method, path, answer.status, want))
            if who == NOBODY:
                assert answer.location.startswith("/console/login"), (method, path)
            if want == 404:
                assert "Ein anderes Haus" not in answer.text
    wrong = [a for a in answers if a[3] != a[4]]
    assert wrong == [], "\n".join(
        f"{w} {m} {p}: got {got}, want {want}" for w, m, p, got, want in wrong
    )
    assert await world.journal_size() == before, "a refused or read request wrote to the journal"


async def test_another_agents_message_is_not_found_and_lists_leak_nothing(world: World) -> None:
    for who, sees in ((AGENT, False), (LEAD, False), (OTHER_AGENT, True), (AUDITOR, True)):
        listing = await world.consoles[who].get("/console/messages")
        assert listing.status == 200
        assert ("Ein anderes Haus" in listing.text) is sees, who
        assert ("Villa am See" in listing.text) is (who != OTHER_AGENT), who
        page = await world.consoles[who].get(f"/console/messages/{world.others_message}")
        assert page.status == (200 if sees else 404), who
    waiting = await world.consoles[OTHER_AGENT].get("/console/letters")
    assert "paula@example.com" not in waiting.text


async def test_an_api_key_opens_no_console_page(world: World) -> None:
    made = await world.site.relay.web_parts().api_keys.create("crm", ApiKeyScope.WRITE, "test")
    nobody = world.consoles[NOBODY]
    for path in (
        "/console/messages",
        f"/console/messages/{world.letter_message}",
        "/console/admin",
    ):
        async with nobody.http.get(
            nobody.base + path,
            headers={"Authorization": f"Bearer {made.key}"},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 303, path
            assert answer.headers["Location"].startswith("/console/login")


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(world: World) -> None:
    before = await world.journal_size()
    agent = world.consoles[AGENT]
    for form in ({}, {"csrf": "0" * 64}):
        answer = await agent.post(
            f"/console/messages/{world.link_message}/revoke",
            {**form, "recipient": "buyer@example.com", "reason": "test"},
        )
        assert answer.status == 403
    token = await world.csrf(AGENT)
    foreign = await agent.post(
        f"/console/messages/{world.link_message}/revoke",
        {"csrf": token, "recipient": "buyer@example.com"},
        Origin="https://evil.example",
    )
    assert foreign.status == 403
    admin = world.consoles[ADMIN]
    answer = await admin.post(
        "/console/admin/users", {"email": "new@broker.example", "role": "agent"}
    )
    assert answer.status == 403
    assert await world.journal_size() == before
    response, _ = await world.site.get(f"/d/{world.link_token}")
    assert response.status == 200, "the link still works"


async def test_a_refused_page_is_the_consoles_own_page_in_the_users_language(
    world: World,
) -> None:
    before = await world.journal_size()
    agent = world.consoles[AGENT]
    answer = await agent.get("/console/admin")
    assert answer.status == 403
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "Not allowed" in answer.text and "/console/messages" in answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    auditor = world.consoles[AUDITOR]
    token = await world.csrf(AUDITOR)
    refused = await auditor.post(
        "/console/admin/users", {"csrf": token, "email": "new@broker.example", "role": "agent"}
    )
    assert refused.status == 403 and "Not allowed" in refused.text
    assert "new@broker.example" not in refused.text
    assert await world.journal_size() == before


async def test_an_unknown_console_path_is_the_consoles_own_404_behind_sign_in(
    world: World,
) -> None:
    before = await world.journal_size()
    agent = world.consoles[AGENT]
    for path in ("/console/no-such-page", "/console/messages/x/y/z", "/console/admin/nope"):
        answer = await agent.get(path)
        assert answer.status == 404, path
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "Page not found" in answer.text and "no such page in the console" in answer.text
        assert 'href="/console/messages"' in answer.text, "the console's navigation"
        assert "Link not found" not in answer.text, "not the prospects' page"
        assert answer.headers["Cache-Control"] == "no-store"
    nobody = world.consoles[NOBODY]
    answer = await nobody.get("/console/no-such-page?x=1")
    assert answer.status == 303
    login, _, query = answer.location.partition("?")
    assert login == "/console/login"
    assert parse_qs(query) == {"next": ["/console/no-such-page?x=1"]}
    # a wrong method on a known page keeps its 405; the prospects' unknown paths their page
    token = await world.csrf(AGENT)
    assert (await agent.post("/console/messages", {"csrf": token})).status == 405
    outside = await agent.get("/no-such-page")
    assert outside.status == 404 and "Link not found" in outside.text
    assert await world.journal_size() == before
