"""A running relay with messages of several senders, users of every role and their signed-in
consoles, shared by the console page tests (tests/console/test_console_work*.py).

Messages are made the real way (sent through SMTP): an offer to a prospect (a registered
letter), a mail with a large attachment (a download link), and a message of another agent.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from gateway import users
from gateway.store.models import Event, Letter, Link, LinkKind, Message, Role
from tests.conftest import AGENT, PASSWORD
from tests.console.client import ConsoleClient, hidden_fields
from tests.letter_site import LetterSite, offer
from tests.queue_wait import queue_idle

OTHER_AGENT = "other@broker.example"
LEAD = "lead@broker.example"
AUDITOR = "auditor@broker.example"
ADMIN = "admin@broker.example"
BUYER = "buyer@example.com"
GROUP = "nord"
ROLES = {
    AGENT: (Role.AGENT, GROUP),
    OTHER_AGENT: (Role.AGENT, "sued"),
    LEAD: (Role.TEAM_LEAD, GROUP),
    AUDITOR: (Role.AUDITOR, None),
    ADMIN: (Role.ADMIN, None),
}
DOWNLOAD = re.compile(r"/d/([A-Za-z0-9_-]{43})")


def download_token(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    [token] = set(DOWNLOAD.findall(body.get_content()))
    return token


@dataclass
class World:
    site: LetterSite
    letter_token: str
    letter_message: str
    letter_id: str
    link_token: str
    link_message: str
    link_id: str
    others_message: str
    consoles: dict[str, ConsoleClient] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.site.url

    async def journal_size(self) -> int:
        async with self.site.relay.db.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(Event)) or 0)

    async def csrf(self, who: str, path: str = "/console/") -> str:
        page = await self.consoles[who].get(path)
        assert page.status == 200, page.text
        return hidden_fields(page.text)["csrf"]


async def add_users(site: LetterSite) -> None:
    db = site.relay.db
    for email_address, (role, group) in ROLES.items():
        if email_address == AGENT:
            await users.change_user(db, AGENT, group=GROUP)
            continue
        await users.add_user(db, email_address, PASSWORD, role=role, group=group)


async def send_as(site: LetterSite, sender: str, raw: bytes, recipient: str) -> bytes:
    """Send over SMTP as `sender`; the copy the recipient got."""
    before = len(site.sink.messages)
    async with site.harness.client(username=sender, password=PASSWORD) as client:
        await client.sendmail(sender, [recipient], raw)
    await site.sink.expect(before + 1)
    [copy] = [m for m in site.sink.messages[before:] if m.rcpt_tos == [recipient]]
    return copy.data


def as_sender(raw: bytes, sender: str) -> bytes:
    return raw.replace(f"<{AGENT}>".encode(), f"<{sender}>".encode())


async def build_world(site: LetterSite, stack: AsyncExitStack, *, signed_in: bool = True) -> World:
    await add_users(site)
    letter_token, _ = await site.send_offer()
    link_copy = await send_as(site, AGENT, offer(subject="Unterlagen Villa am See"), BUYER)
    await send_as(
        site,
        OTHER_AGENT,
        as_sender(offer(subject="Ein anderes Haus", big=False), OTHER_AGENT),
        "someone@example.com",
    )
    async with site.relay.db.transaction() as session:
        letter = (await session.scalars(select(Letter))).one()
        link = (
            await session.scalars(
                select(Link).where(Link.kind == LinkKind.DOWNLOAD, Link.recipient == BUYER)
            )
        ).one()
        others = (await session.scalars(select(Message).where(Message.sender == OTHER_AGENT))).one()
    world = World(
        site,
        letter_token,
        letter.message_id,
        letter.id,
        download_token(link_copy),
        link.message_id,
        link.id,
        others.id,
    )
    await queue_idle(site.relay.db)
    if signed_in:
        for who in ROLES:
            console = await stack.enter_async_context(ConsoleClient(site.url))
            answer = await console.sign_in(who, PASSWORD)
            assert answer.status == 303, answer.text
            world.consoles[who] = console
        world.consoles["nobody"] = await stack.enter_async_context(ConsoleClient(site.url))
    return world


async def world_of(site: LetterSite) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(site, stack)


async def get_bytes(console: ConsoleClient, path: str) -> tuple[int, bytes, Any]:
    """A GET whose answer may be a file (a PDF, a mail), not a page."""
    async with console.http.get(
        console.base + path, allow_redirects=False, headers=console.headers
    ) as response:
        return response.status, await response.read(), response.headers
