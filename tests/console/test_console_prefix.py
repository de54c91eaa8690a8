"""The console behind a proxy that serves the relay under a path of public_url.

The proxy strips the path before the relay sees a request, so every link, form and redirect
the browser follows must carry it again. An admin crawls every page reachable from the home
page, posts every form on them and signs out; each href, action and Location must start
with the prefix. Without a prefix the same crawl must work as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.conftest import AGENT, PASSWORD
from tests.console.client import Answer, ConsoleClient
from tests.console.work_world import ADMIN, World, build_world, get_bytes
from tests.letter_fixtures import StartSite
from tests.letter_site import PERSON_UA, REQUIRED

PUBLIC_HOST = "https://relay.broker.example"


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


class Page(HTMLParser):
    """The addresses a page makes the browser use, and its forms filled as a user would."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[str] = []
        self.links: list[str] = []
        self.forms: list[Form] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for name in ("href", "action", "src"):
            if name in a:
                self.addresses.append(a[name])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif tag == "input" and self.forms and "name" in a:
            value = a.get("value") or _typed(a.get("type", "text"), a["name"])
            if a.get("type") != "checkbox" or a["name"] == "allow_private":
                self.forms[-1].fields[a["name"]] = value
        elif tag == "textarea" and self.forms:
            self.forms[-1].fields[a["name"]] = "checked with the prospect by phone"
        elif tag == "select" and self.forms:
            self._select = a["name"]
        elif tag == "option" and self._select and self.forms:
            fields = self.forms[-1].fields
            if self._select not in fields or "selected" in a:
                fields[self._select] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def _typed(kind: str, name: str) -> str:
    """What a user types into an empty field of this kind."""
    return {
        "date": (datetime.now(UTC) + timedelta(days=30)).date().isoformat(),
        "email": "new.agent@broker.example",
        "url": "http://127.0.0.1:9/hook",
        "checkbox": "yes",
    }.get(kind, "prefix test" if name in ("name", "reason") else "")


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@dataclass
class Crawl:
    prefix: str
    console: ConsoleClient
    wrong: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    forms: dict[str, Form] = field(default_factory=dict)

    def ours(self, address: str, where: str) -> str | None:
        """The relay path behind an address on a page; records one that lacks the prefix."""
        if address.startswith(("#", "data:")):
            return None
        parts = urlsplit(address)
        if parts.scheme or parts.netloc:
            if f"{parts.scheme}://{parts.netloc}" != PUBLIC_HOST:
                return None  # another site (none on these pages today)
            address = address[len(PUBLIC_HOST) :]
        if not address.startswith(self.prefix + "/"):
            self.wrong.append(f"{where}: {address}")
            return None
        return address[len(self.prefix) :]

    def location(self, answer: Answer, where: str) -> str | None:
        assert answer.status == 303, (where, answer.status, answer.text[:300])
        return self.ours(answer.location, f"Location of {where}")

    async def visit(self, path: str) -> None:
        queue = [path]
        while queue:
            path = queue.pop()
            if path in self.seen:
                continue
            self.seen.add(path)
            if path.endswith((".pdf", ".eml")):
                status, _, _ = await get_bytes(self.console, path)
                assert status == 200, path
                continue
            answer = await self.console.get(path)
            assert answer.status == 200, (path, answer.status)
            page = parse(answer.text)
            for address in page.addresses:
                target = self.ours(address, path)
                if target and address in page.links and target.startswith("/console/"):
                    queue.append(target)
            for form in page.forms:
                target = self.ours(form.action, f"form on {path}")
                if target and form.method == "get":
                    queue.append(target)
                elif target:
                    self.forms.setdefault(target, form)


async def consent_through_the_proxy(web_url: str, token: str) -> None:
    """The prospect's consent, a consent PDF and a released original for the console to show."""
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(f"{web_url}/l/{token}") as page:
            [form] = parse(await page.text()).forms
        fields = {**form.fields, **dict.fromkeys(REQUIRED, "yes")}
        async with http.post(f"{web_url}/l/{token}", data=fields, allow_redirects=False) as done:
            assert done.status == 303, await done.text()


@pytest.fixture(params=["/sealrelay", ""], ids=["under-a-path", "at-the-root"])
async def world(request: pytest.FixtureRequest, site_factory: StartSite) -> AsyncIterator[World]:
    site = await site_factory(server={"public_url": PUBLIC_HOST + request.param})
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack, signed_in=False)


async def test_every_console_link_form_and_redirect_carries_public_urls_path(
    world: World,
) -> None:
    relay = world.site.harness
    prefix = urlsplit(relay.settings.server.public_url).path.rstrip("/")
    await consent_through_the_proxy(relay.web_url, world.letter_token)

    async with ConsoleClient(relay.web_url, behind_https=True) as nobody:
        crawl = Crawl(prefix, nobody)
        # the guard sends a visitor who is not signed in to the sign-in page...
        answer = await nobody.get("/console/messages?q=Villa")
        target = crawl.location(answer, "GET without a session")
        assert target is not None and urlsplit(target).path == "/console/login"
        assert parse_qs(urlsplit(target).query) == {"next": ["/console/messages?q=Villa"]}
        answer = await nobody.post("/console/admin/users", {})
        assert crawl.location(answer, "POST without a session") == "/console/login"
        # ...whose form, once signed in, leads back to the page asked for
        login = await nobody.get(target)
        [form] = parse(login.text).forms
        assert crawl.ours(form.action, "sign-in form") == "/console/login"
        answer = await nobody.post(
            "/console/login", {**form.fields, "email": AGENT, "password": PASSWORD}
        )
        assert crawl.location(answer, "sign-in") == "/console/messages?q=Villa"
        assert crawl.wrong == []

    async with ConsoleClient(relay.web_url, behind_https=True) as admin:
        assert (await admin.sign_in(ADMIN, PASSWORD)).status == 303
        crawl = Crawl(prefix, admin)
        for typed in ("/", "/console"):  # what an admin types leads to the console's home
            assert crawl.location(await admin.get(typed), f"GET {typed}") == "/console/"
        await crawl.visit("/console/")
        visited = {urlsplit(p).path for p in crawl.seen}
        for page in (
            "/console/messages",
            "/console/letters",
            f"/console/messages/{world.letter_message}",
            f"/console/messages/{world.letter_message}/letters/{world.letter_id}/preview",
            f"/console/messages/{world.letter_message}/letters/{world.letter_id}/consent.pdf",
            f"/console/messages/{world.letter_message}/letters/{world.letter_id}/original.eml",
            f"/console/messages/{world.link_message}/links/{world.link_id}/preview",
            "/console/admin/users",
            "/console/admin/queue",
            "/console/admin/webhooks",
            "/console/admin/keys",
            "/console/admin/journal",
        ):
            assert page in visited, f"the crawl never reached {page}"

        # every form, the sign-out ones last; each redirect back must carry the prefix too
        redirected: list[str] = []
        sign_out = ("/console/logout", "/console/logout-everywhere")

        async def submit(action: str, form: Form) -> None:
            answer = await admin.post(action, form.fields)
            if answer.status == 303:
                back = crawl.location(answer, f"POST {action}")
                redirected.append(action)
                if back and action not in sign_out:
                    assert (await admin.get(back)).status == 200, back
                return
            # 400: a form posted as found, with its required fields empty (a password, a range)
            assert answer.status in (200, 201, 400, 409), (action, answer.status, answer.text[:300])
            for address in parse(answer.text).addresses:
                crawl.ours(address, f"answer to POST {action}")

        posted: set[str] = set()
        for _ in range(2):  # the second round: forms of what the first one made (a webhook)
            # a revoked link can no longer be extended: revoke after everything else
            for action, form in sorted(crawl.forms.items(), key=lambda f: "/revoke" in f[0]):
                if action not in sign_out and action not in posted:
                    posted.add(action)
                    await submit(action, form)
            crawl.seen.clear()
            await crawl.visit("/console/")
        await submit("/console/logout", crawl.forms["/console/logout"])
        assert crawl.wrong == [], "\n".join(crawl.wrong)
        # the redirecting actions were all exercised, not refused before their redirect
        for action in (
            f"/console/messages/{world.link_message}/revoke",
            f"/console/messages/{world.link_message}/extend",
            "/console/admin/users/change",
            "/console/logout",
        ):
            assert action in redirected, (action, redirected)
        assert any(a.endswith(("/disable", "/enable")) for a in redirected), redirected
