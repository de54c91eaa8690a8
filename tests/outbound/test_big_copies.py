"""A 10 MB message leaves streamed from the blob store: signed, byte for byte, dot lines
intact, through a real relay into a real SMTP sink, on SQLite and PostgreSQL.

A store that fails while the copy is being sent (S3 cut mid-answer) and a blob gone from a
local store defer the copy: the connection is closed before the data's end, the sink stores
nothing, nothing is recorded as delivered and nothing bounces; once the store is back the
copy leaves whole, once.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, Event
from gateway.store.models import Message as MessageRow
from tests.conftest import AGENT, Harness, StartRelay, dkim_dns
from tests.fronts.test_big_data import client
from tests.queue_wait import queue_idle
from tests.s3_server import KEY_ID, REGION, SECRET, S3Door, S3Server

PROSPECT = "paula@example.org"
LIMIT = 12_000_000
WAIT = 60


async def send(harness: Harness, raw: bytes) -> None:
    """From smtplib in a thread: the relay's loop is not also the client's."""

    def sent() -> int:
        with client(harness) as smtp:
            smtp.mail(AGENT)
            smtp.rcpt(PROSPECT)
            return smtp.data(raw)[0]

    assert await asyncio.to_thread(sent) == 250


def big_mail() -> bytes:
    """10 MB: lines of "." every few bytes over the first 2.5 MB (so the reads, 1 MiB each,
    end around them), base64 after, empty lines at the end."""
    header = (
        f"From: Anna Agent <{AGENT}>\r\nTo: {PROSPECT}\r\nSubject: Villa am See\r\n"
        "Message-ID: <big@broker.example>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    dots = b".\r\n..\r\n.x\r\nText  mit\tLeerraum \r\n" * 80_000
    encoded = base64.encodebytes(random.Random(18).randbytes(5_400_000))
    return header + dots + encoded.replace(b"\n", b"\r\n") + b"\r\n\r\n"


async def the_delivery(db: Database) -> Delivery:
    async with db.transaction() as session:
        return (await session.scalars(select(Delivery))).one()


async def first_attempt(db: Database) -> Delivery:
    async with asyncio.timeout(WAIT):
        while (delivery := await the_delivery(db)).attempts == 0:
            await asyncio.sleep(0.05)
    return delivery


async def event_types(db: Database) -> list[str]:
    async with db.transaction() as session:
        return list((await session.scalars(select(Event.type))).all())


def assert_arrived_whole(harness: Harness, data: bytes, raw: bytes) -> None:
    assert data.endswith(raw), "the stored copy did not arrive byte for byte"
    assert dkimpy.verify(data, dnsfunc=dkim_dns(harness.dkim_key))


async def test_a_10_mb_message_leaves_signed_and_intact(
    relay_factory: StartRelay, database: Database
) -> None:
    harness = await relay_factory(smtp={"max_message_size": LIMIT})
    raw = big_mail()
    await send(harness, raw)
    [received] = await harness.sink.expect(1, timeout=WAIT)
    assert received.rcpt_tos == [PROSPECT]
    head = received.data[: len(received.data) - len(raw)]
    assert head.startswith(b"DKIM-Signature:") and b"(sealrelay)" in head
    assert_arrived_whole(harness, received.data, raw)
    await queue_idle(database)
    assert (await the_delivery(database)).status == DeliveryStatus.DELIVERED


@pytest.fixture
async def door(s3_server: S3Server) -> AsyncIterator[S3Door]:
    async with S3Door(s3_server) as opened:
        yield opened


def s3_storage(tmp_path: Path, door: S3Door, bucket: str) -> dict[str, Any]:
    secret = tmp_path / "s3.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return {
        "path": str(tmp_path / "blobs"),
        "url": f"s3://{bucket}/relay",
        "endpoint_url": door.endpoint_url,
        "region": REGION,
        "addressing_style": "path",
        "access_key_id": KEY_ID,
        "secret_access_key_file": str(secret),
    }


async def test_a_store_failing_mid_send_defers_and_the_copy_leaves_whole_later(
    relay_factory: StartRelay,
    database: Database,
    tmp_path: Path,
    door: S3Door,
    s3_bucket: str,
) -> None:
    """The bucket goes away 3 MB into the copy's one read of the original (its body hash
    was kept at intake), while the copy is being written to the sink."""
    storage = s3_storage(tmp_path, door, s3_bucket)
    intake = await relay_factory(roles={"smtp"}, storage=storage, smtp={"max_message_size": LIMIT})
    raw = big_mail()
    await send(intake, raw)
    door.cut_after(3_000_000)
    await relay_factory(roles={"worker"}, storage=storage)

    delivery = await first_attempt(database)
    assert door.cut.is_set() and intake.sink.most_connections >= 1  # cut while sending
    assert delivery.status == DeliveryStatus.QUEUED
    assert (delivery.last_error or "").startswith("blob store unavailable: ")
    assert intake.sink.messages == []
    types = await event_types(database)
    assert "delivery.delivered" not in types and "delivery.bounced" not in types

    await door.open()
    [received] = await intake.sink.expect(1, timeout=WAIT)
    assert_arrived_whole(intake, received.data, raw)
    await queue_idle(database)
    assert (await the_delivery(database)).status == DeliveryStatus.DELIVERED
    assert len(intake.sink.messages) == 1


async def test_a_blob_gone_from_the_store_defers_and_leaves_once_it_is_back(
    relay_factory: StartRelay, database: Database, tmp_path: Path
) -> None:
    intake = await relay_factory(roles={"smtp"}, smtp={"max_message_size": LIMIT})
    raw = big_mail()
    await send(intake, raw)
    async with database.transaction() as session:
        digest = (await session.scalars(select(MessageRow.blob))).one()
    blobs = intake.relay.blobs
    stored = await blobs.read(digest)
    await blobs.delete(digest)
    await relay_factory(roles={"worker"})

    delivery = await first_attempt(database)
    assert delivery.status == DeliveryStatus.QUEUED
    assert f"blob {digest} is not in the store" in (delivery.last_error or "")
    assert intake.sink.messages == []
    types = await event_types(database)
    assert "delivery.delivered" not in types and "delivery.bounced" not in types

    assert await blobs.put(stored) == digest
    [received] = await intake.sink.expect(1, timeout=WAIT)
    assert_arrived_whole(intake, received.data, raw)
