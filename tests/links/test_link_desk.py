"""The link desk without the web: finding links and what a visit writes, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from gateway.links.desk import LinkDesk, LinkExpired, LinkUnknown
from gateway.links.tokens import Closed, LinkState, TokenClosed, TokenUnknown, new_link, new_token
from gateway.store.db import Database
from gateway.store.models import Event, LinkFile, LinkKind, Message, StoredFile

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PROSPECT = "prospect@example.com"


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Made:
    token: str
    link_id: str
    message: Message
    files: list[StoredFile]


async def make_link(db: Database, now: datetime, *, files: int = 2, days: int = 7) -> Made:
    async with db.transaction() as session:
        message = Message(
            sender="agent@broker.example",
            blob="0" * 64,
            size=0,
            message_id_header="<m@broker.example>",
            subject="Exposé",
            received_at=now,
        )
        session.add(message)
        await session.flush()
        stored = [
            StoredFile(
                message_id=message.id,
                sha256=f"{n:064x}",
                filename=f"Teil {n}.pdf",
                content_type="application/pdf",
                size=10 + n,
            )
            for n in range(files)
        ]
        session.add_all(stored)
        await session.flush()
        token = new_token()
        link, entries = new_link(
            token=token,
            kind=LinkKind.DOWNLOAD,
            message_id=message.id,
            recipient=PROSPECT,
            language="de",
            now=now,
            days=days,
            files=stored,
        )
        session.add(link)
        await session.flush()
        session.add_all(entries)
    return Made(token, link.id, message, stored)


async def events(db: Database, *types: str) -> list[Event]:
    async with db.transaction() as session:
        query = select(Event).where(Event.type.in_(types)).order_by(Event.id)
        return list((await session.scalars(query)).all())


async def test_find_tells_valid_unknown_and_expired_apart(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock)
    made = await make_link(database, clock.now)
    found = await desk.find(made.token)
    assert found.link.id == made.link_id
    assert [f.filename for f in found.files] == ["Teil 0.pdf", "Teil 1.pdf"]
    for token in ("", "x" * 101, new_token()):
        with pytest.raises(LinkUnknown) as unknown:
            await desk.find(token)
        assert isinstance(unknown.value, TokenUnknown)
    clock.now += timedelta(days=7)
    with pytest.raises(LinkExpired) as expired:
        await desk.find(made.token)
    assert isinstance(expired.value, TokenClosed)
    assert expired.value.reason is Closed.EXPIRED
    assert expired.value.found.link.id == made.link_id
    assert expired.value.found.state is LinkState.EXPIRED


async def test_view_download_and_zip_are_journaled(database: Database) -> None:
    desk = LinkDesk(database, Clock())
    made = await make_link(database, START)
    found = await desk.find(made.token)
    await desk.record_view(found, "192.0.2.1", "Browser")
    assert await desk.record_download(found, made.files[0], "192.0.2.1", "Browser") is True
    assert await desk.record_download(found, made.files[0], "192.0.2.1", "Browser") is False
    await desk.record_zip(found, "192.0.2.2", "Zipper")
    written = await events(
        database, "link.viewed", "download.first", "download.repeat", "download.zip"
    )
    assert [e.type for e in written] == [
        "link.viewed",
        "download.first",
        "download.repeat",
        "download.zip",
    ]
    assert all(e.message_id == made.message.id for e in written)
    assert written[0].data == {
        "link_id": made.link_id,
        "recipient": PROSPECT,
        "ip": "192.0.2.1",
        "user_agent": "Browser",
    }
    assert written[1].data["file_id"] == made.files[0].id
    assert written[3].data["files"] == [
        {"file_id": f.id, "filename": f.filename} for f in made.files
    ]


async def test_concurrent_downloads_make_exactly_one_first(database: Database) -> None:
    desk = LinkDesk(database, Clock())
    made = await make_link(database, START, files=1)
    found = await desk.find(made.token)
    firsts = await asyncio.gather(
        *(desk.record_download(found, made.files[0], f"192.0.2.{n}", "UA") for n in range(8))
    )
    assert sorted(firsts) == [False] * 7 + [True]
    assert len(await events(database, "download.first")) == 1
    assert len(await events(database, "download.repeat")) == 7
    async with database.transaction() as session:
        assert await session.scalar(select(LinkFile.downloads)) == 8


async def test_a_file_the_link_lost_is_not_counted(database: Database) -> None:
    desk = LinkDesk(database, Clock())
    made = await make_link(database, START, files=1)
    found = await desk.find(made.token)
    async with database.transaction() as session:
        entry = await session.scalar(select(LinkFile))
        await session.delete(entry)
    assert await desk.record_download(found, made.files[0], "192.0.2.1", "UA") is False
    assert await events(database, "download.first", "download.repeat") == []


async def test_recipient_link_is_the_valid_one_only(database: Database) -> None:
    clock = Clock()
    desk = LinkDesk(database, clock)
    made = await make_link(database, START)
    found = await desk.recipient_link(made.message, PROSPECT)
    assert found is not None and found.link.id == made.link_id
    assert await desk.recipient_link(made.message, "someone@example.com") is None
    clock.now += timedelta(days=8)
    assert await desk.recipient_link(made.message, PROSPECT) is None
