"""What agents do to links (revoke, extend, preview) and how scanners' visits are recorded,
through the link desk, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from gateway.agent_actions import InvalidRequest, UnknownTarget, WrongState
from gateway.links.desk import LinkDesk, LinkExpired
from gateway.links.tokens import Closed, LinkState, new_link, new_token
from gateway.store.db import Database
from gateway.store.models import Event, Link, LinkFile, LinkKind
from rules.automated_visits import ScannerRules
from tests.links.test_link_desk import PROSPECT, Clock, Made, events, make_link

PERSON = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1"
SAFE_LINKS = "Mozilla/5.0 (compatible; Microsoft Office/16.0; SafeLinks)"
# the tests' own address stands for a scanner's data centre
LOOPBACK_IS_A_DATA_CENTRE = ScannerRules.configured(
    window_seconds=120, extra_networks=["127.0.0.0/8"], shipped_networks=False
)


async def journal_size(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Event)) or 0)


async def downloads(db: Database, made: Made) -> list[int]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(LinkFile.downloads)
            .where(LinkFile.link_id == made.link_id)
            .order_by(LinkFile.position)
        )
        return list(rows)


async def link_row(db: Database, link_id: str) -> Link:
    async with db.transaction() as session:
        link = await session.get(Link, link_id)
        assert link is not None
        return link


async def add_letter_link(db: Database, made: Made, clock: Clock, days: int = 14) -> str:
    async with db.transaction() as session:
        link, _ = new_link(
            token=new_token(),
            kind=LinkKind.LETTER,
            message_id=made.message.id,
            recipient=PROSPECT.upper(),  # the address as the agent typed it
            language="de",
            now=clock.now,
            days=days,
        )
        session.add(link)
    return link.id


async def test_a_scanner_never_downloads_first(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock, scanners=LOOPBACK_IS_A_DATA_CENTRE)
    made = await make_link(database, clock.now)
    found = await desk.find(made.token)
    stored = made.files[0]

    clock.now += timedelta(seconds=3)  # Safe Links fetches as the mail arrives
    assert (await desk.record_view(found, "127.0.0.1", PERSON)).automated
    assert not await desk.record_download(found, stored, "127.0.0.1", PERSON)
    assert not await desk.record_download(found, stored, "203.0.113.9", SAFE_LINKS)
    assert not await desk.record_download(found, stored, "203.0.113.9", PERSON, method="HEAD")
    await desk.record_zip(found, "203.0.113.9", SAFE_LINKS)
    assert await downloads(database, made) == [0, 0]
    automated = await events(database, "link.viewed", "download.automated", "download.zip")
    assert [e.type for e in automated] == [
        "link.viewed",
        *["download.automated"] * 3,
        "download.zip",
    ]
    assert all(e.data["automated"] is True and e.data["automated_reasons"] for e in automated)
    assert automated[0].data["automated_reasons"] == [
        "configured address, no cookie, 3 s after delivery"
    ]

    # the same data-centre address with a cookie, or after the window: a person (a VPN)
    assert not (await desk.record_view(found, "127.0.0.1", PERSON, has_cookie=True)).automated
    clock.now += timedelta(minutes=5)
    assert await desk.record_download(found, stored, "127.0.0.1", PERSON)
    assert not await desk.record_download(found, stored, "127.0.0.1", PERSON)
    assert await downloads(database, made) == [2, 0]
    people = await events(database, "download.first", "download.repeat")
    assert [e.type for e in people] == ["download.first", "download.repeat"]
    assert all("automated" not in e.data for e in people)


async def test_revoke_ends_every_link_of_the_recipient_once(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock)
    made = await make_link(database, clock.now)
    other = await make_link(database, clock.now)  # another message's link stays open
    letter_link = await add_letter_link(database, made, clock)
    before = await journal_size(database)

    for message_id, recipient in (("nope", PROSPECT), (made.message.id, "else@example.com")):
        with pytest.raises(UnknownTarget):
            await desk.revoke(message_id, recipient, "anna@broker.example")
    for actor in ("", "  ", "x" * 321):
        with pytest.raises(InvalidRequest):
            await desk.revoke(made.message.id, PROSPECT, actor)
    with pytest.raises(InvalidRequest):
        await desk.revoke(made.message.id, PROSPECT, "anna", reason="r" * 501)
    assert await journal_size(database) == before
    assert (await link_row(database, made.link_id)).revoked_at is None

    clock.now += timedelta(hours=1)
    ended = await desk.revoke(made.message.id, PROSPECT, "anna@broker.example", "wrong client")
    assert sorted(ended) == sorted([made.link_id, letter_link])
    assert (await link_row(database, made.link_id)).revoked_at == clock.now
    revoked = await events(database, "link.revoked")
    assert {e.data["kind"] for e in revoked} == {"download", "letter"}
    assert all(
        e.data["actor"] == "anna@broker.example" and e.data["reason"] == "wrong client"
        for e in revoked
    )
    assert all(e.message_id == made.message.id for e in revoked)

    with pytest.raises(LinkExpired) as closed:
        await desk.find(made.token)
    assert closed.value.reason is Closed.REVOKED
    assert (await desk.find(other.token)).link.id == other.link_id

    clock.now += timedelta(hours=1)
    size = await journal_size(database)
    assert await desk.revoke(made.message.id, PROSPECT, "anna@broker.example") == []
    assert await journal_size(database) == size
    assert (await link_row(database, made.link_id)).revoked_at == clock.now - timedelta(hours=1)


async def test_extend_validates_reopens_and_refuses_revoked(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock, link_grace=timedelta(days=7))
    made = await make_link(database, clock.now, days=7)
    letter_link = await add_letter_link(database, made, clock)
    before = await journal_size(database)
    original = (await link_row(database, made.link_id)).expires_at

    bad = [
        (made.link_id, clock.now - timedelta(seconds=1), InvalidRequest),
        (made.link_id, clock.now, InvalidRequest),
        (made.link_id, clock.now.replace(tzinfo=None) + timedelta(days=1), InvalidRequest),
        (made.link_id, clock.now + timedelta(days=3651), InvalidRequest),
        ("no-such-link", clock.now + timedelta(days=1), UnknownTarget),
        (("no-such-message", PROSPECT), clock.now + timedelta(days=1), UnknownTarget),
        # the download link may have 400 days, the letter's not: nothing of either is written
        ((made.message.id, PROSPECT), clock.now + timedelta(days=400), InvalidRequest),
    ]
    for target, until, error in bad:
        with pytest.raises(error):
            await desk.extend(target, until, "anna@broker.example")
    assert await journal_size(database) == before
    assert (await link_row(database, made.link_id)).expires_at == original

    clock.now += timedelta(days=9)  # expired two days ago; its files are kept for seven
    with pytest.raises(LinkExpired):
        await desk.find(made.token)
    until = clock.now + timedelta(days=30)
    assert await desk.extend(made.link_id, until, "anna@broker.example") == [made.link_id]
    found = await desk.find(made.token)
    assert found.state is LinkState.VALID and found.link.expires_at == until
    [extended] = await events(database, "link.extended")
    assert extended.data["previous_expires_at"] == original.isoformat()
    assert extended.data["expires_at"] == until.isoformat()
    assert extended.data["actor"] == "anna@broker.example"

    both = await desk.extend((made.message.id, PROSPECT), until, "admin")
    assert sorted(both) == sorted([made.link_id, letter_link])

    await desk.revoke(made.message.id, PROSPECT, "admin")
    size = await journal_size(database)
    with pytest.raises(WrongState, match="revoked"):
        await desk.extend(made.link_id, until + timedelta(days=1), "admin")
    with pytest.raises(WrongState, match="revoked"):
        await desk.extend((made.message.id, PROSPECT), until + timedelta(days=1), "admin")
    assert await journal_size(database) == size

    stale = await make_link(database, clock.now, days=1)
    clock.now += timedelta(days=9)  # past its files' grace: they may be gone
    with pytest.raises(WrongState, match="no longer kept"):
        await desk.extend(stale.link_id, clock.now + timedelta(days=1), "admin")


async def test_preview_writes_nothing(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock)
    made = await make_link(database, clock.now)
    size = await journal_size(database)
    shown = await desk.preview(made.link_id, "admin")
    assert await journal_size(database) == size
    assert shown.state is LinkState.VALID
    assert [f.filename for f in shown.files] == ["Teil 0.pdf", "Teil 1.pdf"]
    assert shown.message.subject == "Exposé"
    await desk.revoke(made.message.id, PROSPECT, "admin")
    assert (await desk.preview(made.link_id, "admin")).state is LinkState.REVOKED
    size = await journal_size(database)
    await desk.preview(made.link_id, "admin")
    assert await journal_size(database) == size
    assert await downloads(database, made) == [0, 0]
    with pytest.raises(UnknownTarget):
        await desk.preview("no-such-link", "admin")
    with pytest.raises(InvalidRequest):
        await desk.preview(made.link_id, "")
