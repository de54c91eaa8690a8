"""Link expiry and blob collection, with a controllable clock, on both backends."""

from __future__ import annotations

import asyncio
import email.policy
import os
import sys
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import select, update

from gateway import users
from gateway.config import StorageSettings
from gateway.intake.pipeline import Envelope, Origin, Pipeline
from gateway.store import sweeper
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Delivery, DeliveryStatus, Event, Link, Message, StoredFile
from gateway.users import Agent
from tests.conftest import AGENT, relay_settings
from tests.support import chained

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
GRACE = timedelta(days=7)


def offer(size: int) -> bytes:
    message = EmailMessage()
    message["From"] = AGENT
    message["To"] = "p@example.com"
    message["Subject"] = "Exposé"
    message.set_content("Anbei.")
    message.add_attachment(
        os.urandom(size), maintype="application", subtype="pdf", filename="expose.pdf"
    )
    return message.as_bytes(policy=email.policy.SMTP)


async def submit(database: Database, blobs: LocalBlobStore, raw: bytes, at: datetime) -> None:
    settings = relay_settings(blobs.root.parent, 25)
    pipeline = Pipeline(settings, database, blobs, clock=lambda: at)
    found = [u for u, _ in await users.list_users(database) if u.email == AGENT]
    user = found[0] if found else await users.add_user(database, AGENT, "a long password")
    agent = Agent(user.id, AGENT, None, False, frozenset([AGENT]))
    await pipeline.submit(
        Envelope(AGENT, ("p@example.com",)), raw, agent, Origin("test", "127.0.0.1", "TEST")
    )


async def test_links_expire_then_their_files_go_after_the_grace_period(
    database: Database, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await submit(database, blobs, offer(3 * 1024 * 1024), START)
    async with database.transaction() as session:
        [stored] = (await session.scalars(select(StoredFile))).all()
        [message] = (await session.scalars(select(Message))).all()
    orphan = await blobs.put(b"left behind by an intake that never committed")

    fresh = await sweeper.sweep(database, blobs, START + timedelta(days=1), GRACE)
    assert (fresh.links_expired, fresh.blobs_deleted) == (0, 0)

    # Past expiry (90 days): the link expires, the file stays for the grace period.
    expired = await sweeper.sweep(database, blobs, START + timedelta(days=91), GRACE)
    assert expired.links_expired == 1
    assert await blobs.exists(stored.sha256)
    assert not await blobs.exists(orphan)  # nothing names it and it is older than the grace period

    collected = await sweeper.sweep(database, blobs, START + timedelta(days=99), GRACE)
    assert collected.links_expired == 0
    assert collected.blobs_deleted == 1
    assert collected.bytes_freed == 3 * 1024 * 1024
    assert not await blobs.exists(stored.sha256)
    assert await blobs.exists(message.blob)

    assert (await chained(database)).ok
    async with database.transaction() as session:
        [link] = (await session.scalars(select(Link))).all()
        types = [e.type for e in (await session.scalars(select(Event).order_by(Event.id)))]
    assert link.expired
    assert types.count("link.expired") == 1
    assert types.count("blobs.deleted") == 2


async def test_originals_go_once_nothing_needs_them_and_their_days_are_over(
    database: Database, tmp_path: Path
) -> None:
    """Data minimisation: a message's original and copies live while a copy waits and
    `keep_originals_days` from its receipt; a link of it does not need them (its pages name
    the agent as the intake kept them), unless the message was stored before that name was
    kept. Its rows and events stay."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    keep = timedelta(days=30)
    await submit(database, blobs, offer(1000), START)  # small: no link
    await submit(database, blobs, offer(3 * 1024 * 1024), START)  # a link for 90 days
    await submit(database, blobs, offer(3 * 1024 * 1024 + 1), START)  # ... stored before 0016
    await submit(database, blobs, offer(2000), START + timedelta(days=20))
    async with database.transaction() as session:
        plain, recent, linked, older = sorted(
            (await session.scalars(select(Message))).all(), key=lambda m: m.size
        )
        assert linked.sender_name == ""  # the From names no one, only the address
        await session.execute(
            update(Message).where(Message.id == older.id).values(sender_name=None)
        )
        copies = {d.message_id: d.blob for d in await session.scalars(select(Delivery))}

    waiting = await sweeper.sweep(
        database, blobs, START + timedelta(days=40), GRACE, originals=keep
    )
    assert waiting.blobs_deleted == 0, "copies still waiting to leave keep their originals"

    async with database.transaction() as session:
        await session.execute(update(Delivery).values(status=DeliveryStatus.DELIVERED))
    await sweeper.sweep(database, blobs, START + timedelta(days=40), GRACE, originals=keep)
    for gone in (plain, linked):
        assert not await blobs.exists(gone.blob)
        assert not await blobs.exists(copies[gone.id])
    for kept in (recent, older):  # received 20 days ago; a link that lives, name unknown
        assert await blobs.exists(kept.blob)
        assert await blobs.exists(copies[kept.id])

    # the link expired on day 90 and its grace ended on day 97
    await sweeper.sweep(database, blobs, START + timedelta(days=99), GRACE, originals=keep)
    assert not await blobs.exists(older.blob)
    assert not await blobs.exists(recent.blob)
    async with database.transaction() as session:
        assert len((await session.scalars(select(Message))).all()) == 4
    assert (await chained(database)).ok


async def test_without_a_limit_originals_stay(database: Database, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await submit(database, blobs, offer(1000), START)
    async with database.transaction() as session:
        await session.execute(update(Delivery).values(status=DeliveryStatus.DELIVERED))
        [message] = (await session.scalars(select(Message))).all()
    originals = StorageSettings(keep_originals_days=0).originals_kept()
    assert originals is None
    await sweeper.sweep(database, blobs, START + timedelta(days=999), GRACE, originals=originals)
    assert await blobs.exists(message.blob)


async def test_a_blob_still_linked_elsewhere_is_kept(database: Database, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    raw = offer(3 * 1024 * 1024)
    await submit(database, blobs, raw, START)
    await submit(database, blobs, raw, START + timedelta(days=60))  # same file, newer link
    await sweeper.sweep(database, blobs, START + timedelta(days=100), GRACE)
    async with database.transaction() as session:
        digests = {f.sha256 for f in (await session.scalars(select(StoredFile)))}
    [digest] = digests
    assert await blobs.exists(digest)


async def test_recent_blobs_are_never_collected(database: Database, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    in_flight = await blobs.put(b"written a moment ago by an intake still running")
    report = await sweeper.sweep(database, blobs, datetime.now(UTC), GRACE)
    assert report.blobs_deleted == 0
    assert await blobs.exists(in_flight)


async def test_cli_links_expire(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path}/r.db"\n'
        f'[storage]\npath = "{tmp_path}/blobs"\n'
    )
    created = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sealrelay"), "db", "upgrade", "--config", str(config)
    )
    assert await created.wait() == 0  # only commands that may start a database create one
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sealrelay"),
        "links",
        "expire",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().strip() == (
        "0 link(s) expired, 0 letter(s) expired, 0 blob(s) deleted (0.0 MB freed)"
    )
