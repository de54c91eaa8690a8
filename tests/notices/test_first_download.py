"""The agent hears of a recipient's first downloads: a running relay, real SMTP and HTTP.

The relay's clock is real time plus an offset the test moves on (tests.letter_site.Clock), so
the notice round, which waits ``download_batch_seconds`` after a download, runs as it runs in
production. SQLite and PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from datetime import timedelta
from email.message import EmailMessage

import aiohttp
import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway import users
from gateway.config import GroupSettings, NoticeOverrides
from gateway.mail import headers
from gateway.notices.desk import NoticeDesk
from gateway.store.models import Delivery, Event, NoticeCursor
from gateway.store.sequencer import chain_all
from tests.conftest import AGENT, dkim_dns
from tests.letter_fixtures import StartSite
from tests.letter_site import PROSPECT, Clock, LetterSite
from tests.support import PERSON_UA, chained
from web.console.paths import ACCOUNT

PLAN = os.urandom(3 * 1024 * 1024)
PHOTOS = os.urandom(3 * 1024 * 1024)
SUBJECT = "Unterlagen Seestraße 4"


def with_files() -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>"
    message["Subject"] = SUBJECT
    message.set_content("Guten Tag,\n\nanbei die Unterlagen.\n")
    message.add_attachment(PLAN, maintype="application", subtype="pdf", filename="Grundriss.pdf")
    message.add_attachment(PHOTOS, maintype="application", subtype="zip", filename="Fotos.zip")
    return message.as_bytes(policy=email.policy.SMTP)


class Prospect:
    """The recipient's side: the copy's link and its files, fetched over HTTP."""

    def __init__(self, site: LetterSite, copy: bytes) -> None:
        self.site = site
        link = rf"{re.escape(site.url)}/d/([A-Za-z0-9_-]{{43}})"
        [self.token] = set(re.findall(link, _text(copy)))

    async def files(self) -> list[str]:
        _, page = await self.site.get(f"/d/{self.token}")
        return re.findall(rf'href="(/d/{self.token}/f/[0-9a-f]+)"', page.decode())

    async def download(self, path: str, *, scanner: bool = False) -> None:
        # a scanner: a GET without a user agent (rules/automated_visits.py)
        http = (
            aiohttp.ClientSession(skip_auto_headers=["User-Agent"])
            if scanner
            else aiohttp.ClientSession(headers={"User-Agent": PERSON_UA})
        )
        async with http, http.get(self.site.url + path) as response:
            assert response.status == 200
            await response.read()
        # chained, as the relay's sequencer does within a second: the notices read the chain
        await chain_all(self.site.relay.db)


def _text(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def send(site: LetterSite) -> Prospect:
    before = len(site.sink.messages)
    await site.harness.send(with_files(), recipients=[PROSPECT])
    arrived = await site.sink.expect(before + 1)
    [copy] = [m for m in arrived[before:] if m.rcpt_tos == [PROSPECT]]
    return Prospect(site, copy.data)


async def to_agent(site: LetterSite) -> int:
    return await site.count(Delivery, Delivery.recipient == AGENT)


async def settled(site: LetterSite, clock: Clock) -> None:
    """Move past the batch window and run the notice round ourselves: when it returns, every
    download before the move has been looked at (by this call or the relay's own loop)."""
    clock.advance(seconds=site.harness.settings.notices.download_batch_seconds + 1)
    await site.relay.notices.first_downloads()


async def cursor(site: LetterSite) -> int:
    async with site.relay.db.snapshot() as session:
        return int(await session.scalar(select(NoticeCursor.seq)) or 0)


async def test_first_downloads_make_one_notice_and_repeats_and_scanners_none(
    site: LetterSite, clock: Clock
) -> None:
    prospect = await send(site)
    plan, photos = await prospect.files()

    await prospect.download(plan, scanner=True)  # download.automated: never a first download
    await settled(site, clock)
    assert await to_agent(site) == 0
    assert len(await site.events("download.automated")) == 1
    assert await site.events("download.first") == []

    await prospect.download(plan)
    await prospect.download(photos)  # within the window: one mail names both
    assert len(await site.events("download.first")) == 2
    before = len(site.sink.messages)
    clock.advance(seconds=61)  # the relay's own loop sends it: nothing called here
    arrived = await site.sink.expect(before + 1)
    [notice] = [m for m in arrived[before:] if m.rcpt_tos == [AGENT]]

    assert notice.mail_from in ("", "<>")
    fields = headers.fields_of(notice.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        f"Heruntergeladen: {SUBJECT} – {PROSPECT}"
    )
    assert headers.first_value(fields, "auto-submitted") == "auto-generated"
    assert dkimpy.verify(notice.data, dnsfunc=dkim_dns(site.harness.dkim_key))
    text = _text(notice.data)
    [queued] = await site.events("notice.download_queued")
    message_id = queued.message_id
    assert f"{PROSPECT} hat Dateien zu Ihrer Nachricht „{SUBJECT}“" in text
    assert "• Grundriss.pdf" in text and "• Fotos.zip" in text
    assert f"{site.url}/console/messages/{message_id}" in text
    assert f"Mein Konto“ ein:\r\n{site.url}{ACCOUNT}\r\n" in text  # where it is turned off
    assert "MEZ" in text and "UTC" in text  # [branding] timezone, named
    assert queued.data["recipient"] == PROSPECT and len(queued.data["file_ids"]) == 2

    await prospect.download(plan)  # download.repeat
    await prospect.download(photos, scanner=True)
    await settled(site, clock)
    assert await to_agent(site) == 1
    assert len(await site.events("notice.download_queued")) == 1
    assert (await chained(site.relay.db)).ok


async def test_an_agent_who_turned_it_off_gets_no_notice(site: LetterSite, clock: Clock) -> None:
    prefs = await users.set_notifications(
        site.relay.db, AGENT, {"first_download": False}, site.harness.settings
    )
    assert prefs == users.NoticePrefs(first_download=False, expiry_warning=True)
    assert await users.notifications(site.relay.db, AGENT, site.harness.settings) == prefs
    [changed] = await site.events("user.notices_changed")
    assert changed.data == {"email": AGENT, "first_download": False, "expiry_warning": True}

    prospect = await send(site)
    [plan, _] = await prospect.files()
    await prospect.download(plan)
    await settled(site, clock)
    assert await to_agent(site) == 0
    [first] = await site.events("download.first")
    assert await cursor(site) >= first.seq
    assert await site.events("notice.download_queued") == []


async def test_preferences_refuse_unknown_kinds_and_users(site: LetterSite) -> None:
    with pytest.raises(users.UserError, match="unknown notice kinds: consent"):
        await users.set_notifications(
            site.relay.db, AGENT, {"consent": False}, site.harness.settings
        )
    with pytest.raises(users.UserError, match="no user"):
        await users.set_notifications(
            site.relay.db, "nobody@broker.example", {}, site.harness.settings
        )
    assert await users.notifications(
        site.relay.db, AGENT, site.harness.settings
    ) == users.NoticePrefs(first_download=True, expiry_warning=True)
    # choosing what is already in effect changes nothing, so nothing is journaled
    await users.set_notifications(
        site.relay.db, AGENT, {"expiry_warning": True}, site.harness.settings
    )
    assert await site.events("user.notices_changed") == []


@pytest.fixture
async def slow_site(site_factory: StartSite) -> LetterSite:
    """The relay's own loop waits an hour before it takes a download: the test drives it."""
    return await site_factory(notices={"download_batch_seconds": 3600})


class Crash(Exception):
    pass


async def test_a_crash_before_the_commit_loses_nothing_and_after_it_doubles_nothing(
    slow_site: LetterSite, clock: Clock
) -> None:
    site = slow_site
    prospect = await send(site)
    [plan, _] = await prospect.files()
    await prospect.download(plan)
    start = await cursor(site)
    desk = NoticeDesk(site.harness.settings, site.relay.db, site.relay.blobs, lambda: None, clock)

    with pytest.raises(Crash):  # the process dies after queuing, before the commit
        async with site.relay.db.transaction() as session:
            _, queued = await desk._download_batch(session, clock() + timedelta(hours=1))
            assert queued == 1
            raise Crash
    assert await cursor(site) == start
    assert await to_agent(site) == 0

    clock.advance(hours=2)
    await desk.first_downloads()  # the restarted round does it again (or the relay's own loop)
    assert await to_agent(site) == 1  # the notice is in the queue: durable, sent later
    assert await desk.first_downloads() == 0
    async with site.relay.db.snapshot() as session:
        notices = await session.scalar(
            select(func.count()).select_from(Event).where(Event.type == "notice.download_queued")
        )
    assert notices == 1
    site.relay.signal.notify()
    arrived = await site.sink.expect(2)
    assert [m.rcpt_tos for m in arrived].count([AGENT]) == 1


async def test_a_groups_default_applies_unless_the_agent_chose(
    slow_site: LetterSite, clock: Clock
) -> None:
    site = slow_site  # the relay's own loop keeps out: this desk has the group in its settings
    sales = GroupSettings(name="sales", notices=NoticeOverrides(first_download=False))
    running = site.harness.settings
    window = running.notices.model_copy(update={"download_batch_seconds": 60})
    settings = running.model_copy(update={"groups": [sales], "notices": window})
    later = Clock(clock.offset + timedelta(minutes=2))
    desk = NoticeDesk(settings, site.relay.db, site.relay.blobs, lambda: None, later)
    await users.change_user(site.relay.db, AGENT, group="sales")
    assert await users.notifications(site.relay.db, AGENT, settings) == users.NoticePrefs(
        first_download=False, expiry_warning=True
    )
    prospect = await send(site)
    [plan, photos] = await prospect.files()
    await prospect.download(plan)
    later.advance(minutes=2)
    assert await desk.first_downloads() == 0
    assert await to_agent(site) == 0
    [first] = await site.events("download.first")
    assert await cursor(site) >= first.seq  # looked at, and the group said no

    await users.set_notifications(site.relay.db, AGENT, {"first_download": True}, settings)
    await prospect.download(photos)
    later.advance(minutes=2)
    assert await desk.first_downloads() == 1
    assert await to_agent(site) == 1
    [queued] = await site.events("notice.download_queued")
    assert len(queued.data["file_ids"]) == 1


async def test_a_burst_that_goes_on_past_the_cut_off_waits_and_makes_one_mail(
    site: LetterSite, clock: Clock
) -> None:
    prospect = await send(site)
    plan, photos = await prospect.files()
    await prospect.download(plan)
    clock.advance(seconds=50)
    await prospect.download(photos)  # 50 s later: the same burst
    clock.advance(seconds=15)  # the plan is settled, the photos are not
    await site.relay.notices.first_downloads()
    assert await to_agent(site) == 0
    assert await cursor(site) < min(e.seq for e in await site.events("download.first"))

    await settled(site, clock)
    assert await to_agent(site) == 1
    [queued] = await site.events("notice.download_queued")
    assert len(queued.data["file_ids"]) == 2
