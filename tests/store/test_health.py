"""The database questions of /healthz and /metrics, on SQLite and PostgreSQL; the blob
store's health, told of failures from any thread or loop, and by the store itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.outbound.queue import new_delivery
from gateway.store import health
from gateway.store.blobs import BlobMissing, StoreUnavailable
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import DeliveryStatus, Message
from tests.s3_server import S3Door, S3Server

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


async def test_database_answers(database: Database) -> None:
    await health.database_answers(database)


async def test_queue_depths_name_every_status(database: Database) -> None:
    assert await health.queue_depths(database) == {s.value: 0 for s in DeliveryStatus}
    async with database.transaction() as session:
        message = Message(
            sender="agent@broker.example",
            blob="0" * 64,
            size=0,
            message_id_header="<m@broker.example>",
            subject="Exposé",
            received_at=NOW,
        )
        session.add(message)
        await session.flush()
        deliveries = [
            new_delivery(message.id, f"r{n}@example.com", "0" * 64, NOW, 60) for n in range(3)
        ]
        deliveries[0].status = DeliveryStatus.DELIVERED
        session.add_all(deliveries)
    depths = await health.queue_depths(database)
    assert depths[DeliveryStatus.DELIVERED.value] == 1
    assert sum(depths.values()) == 3
    assert set(depths) == {s.value for s in DeliveryStatus}


class CountedChecks(LocalBlobStore):
    """A real local store that says when a check was answered."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.answered: asyncio.Queue[None] = asyncio.Queue()

    async def check(self) -> None:
        await super().check()
        self.answered.put_nowait(None)


def _told_in_a_thread(blob_health: health.BlobHealth) -> None:
    blob_health.failed(StoreUnavailable("cannot read: a thread's read failed"))


def _told_from_another_loop(blob_health: health.BlobHealth) -> None:
    async def told() -> None:
        blob_health.failed(StoreUnavailable("cannot read: another loop's read failed"))

    asyncio.run(told())


@pytest.mark.parametrize("tell", [_told_in_a_thread, _told_from_another_loop])
async def test_a_failure_told_from_another_thread_or_loop_degrades_and_wakes_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tell: object
) -> None:
    """Degraded at once; the checks, woken through their loop's own queue (the wait between
    them made an hour here, so only the wake can bring the check), make it whole again."""
    monkeypatch.setattr(health, "RECHECK_MAX", 3600.0)
    store = CountedChecks(tmp_path / "blobs")
    blob_health = health.BlobHealth(store)
    stop = asyncio.Event()
    running = asyncio.create_task(blob_health.run(stop))
    try:
        async with asyncio.timeout(30):
            await store.answered.get()
        assert blob_health.available
        assert callable(tell)
        thread = threading.Thread(target=tell, args=(blob_health,))
        thread.start()
        thread.join()
        assert not blob_health.available
        assert (blob_health.problem or "").startswith("cannot read: ")
        async with asyncio.timeout(30):
            await store.answered.get()
        assert blob_health.available
    finally:
        stop.set()
        await running


async def test_the_watched_store_tells_its_failures_and_not_a_missing_blob(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    blob_health = health.BlobHealth(store)
    watched = blob_health.watched(store)
    digest = await watched.put(b"kept")
    with pytest.raises(BlobMissing):
        await watched.read("0" * 64)
    with pytest.raises(BlobMissing):
        await watched.size("0" * 64)
    assert blob_health.available  # a missing blob is no trouble of the store
    (tmp_path / "blobs").rename(tmp_path / "unmounted")
    with pytest.raises(StoreUnavailable):
        await watched.read(digest)
    assert not blob_health.available
    assert (blob_health.problem or "").startswith("cannot read in ")
    (tmp_path / "unmounted").rename(tmp_path / "blobs")
    assert await blob_health.check()
    assert await watched.read(digest) == b"kept"


@pytest.fixture
async def door(s3_server: S3Server) -> AsyncIterator[S3Door]:
    async with S3Door(s3_server) as opened:
        yield opened


async def test_a_read_cut_mid_stream_is_told(door: S3Door, s3_bucket: str) -> None:
    """Through a real S3 server: the blob opens, then its bytes stop halfway."""
    store = door.store(s3_bucket)
    blob_health = health.BlobHealth(store)
    watched = blob_health.watched(store)
    data = bytes(range(256)) * 8192  # 2 MiB
    digest = await watched.put(data)
    received = 0
    with pytest.raises(StoreUnavailable):
        async with watched.open(digest) as blob:
            door.cut_after(len(data) // 2)
            async for chunk in blob.stream(0, blob.size, chunk_size=64 * 1024):
                received += len(chunk)
    assert 0 < received < len(data)
    assert not blob_health.available
    await store.close()
