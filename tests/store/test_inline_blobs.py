"""Small blobs of the intake live in the database, committed with the message: relayed end
to end without a file, swept as files are, never left behind by a failed transaction."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Connection, delete, func, select

from gateway import users
from gateway.config import Settings
from gateway.intake.pipeline import Envelope, Origin, Pipeline
from gateway.store import group_commit, inline_blobs, sweeper
from gateway.store.blobs import BlobMissing, BlobStore
from gateway.store.db import Database
from gateway.store.inline_blobs import InlineBlobStore
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import InlineBlob, Message
from gateway.users import Agent
from tests.cli_runner import sealrelay
from tests.conftest import AGENT, Harness, StartRelay, make_message, relay_settings
from tests.s3_server import S3Server
from tests.store.test_sweeper import START, offer

GRACE = timedelta(days=7)
SMALL = f"From: {AGENT}\r\nSubject: small\r\n\r\nsmall\r\n".encode()


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def submit(db: Database, blobs: BlobStore, raw: bytes, at: datetime, tmp: Path) -> None:
    """A message through the real intake, as the agent, at `at`."""
    found = [u for u, _ in await users.list_users(db) if u.email == AGENT]
    user = found[0] if found else await users.add_user(db, AGENT, "a long password")
    pipeline = Pipeline(relay_settings(tmp, 25), db, blobs, clock=lambda: at)
    await pipeline.submit(
        Envelope(AGENT, ("p@example.com",)),
        raw,
        Agent(user.id, AGENT, None, False, frozenset([AGENT])),
        Origin("test", "127.0.0.1", "TEST"),
    )


def files_in(root: Path) -> list[Path]:
    """The blob files under a local store's root (its tmp directory left out)."""
    return [p for p in root.rglob("*") if p.is_file() and p.parent != root / "tmp"]


async def inline_rows(db: Database) -> dict[str, bytes]:
    async with db.transaction() as session:
        rows = await session.execute(select(InlineBlob.digest, InlineBlob.data))
        return {digest: data for digest, data in rows.all()}


@pytest.fixture
async def store(database: Database, tmp_path: Path) -> AsyncIterator[InlineBlobStore]:
    opened = InlineBlobStore(database, LocalBlobStore(tmp_path / "blobs"), 64 * 1024)
    yield opened
    await opened.close()


async def test_a_small_message_is_relayed_without_a_file(relay: Harness) -> None:
    await relay.send(make_message(body="Guten Tag, anbei die Unterlagen.\n" * 20))
    [received] = await relay.sink.expect(1)
    assert b"anbei die Unterlagen" in received.data
    assert files_in(relay.settings.storage.path) == []
    async with relay.relay.db.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
    stored = await inline_rows(relay.relay.db)
    assert list(stored) == [message.blob]
    assert hashlib.sha256(stored[message.blob]).hexdigest() == message.blob
    assert len(stored[message.blob]) == message.size


async def test_a_big_message_is_still_a_file(relay: Harness) -> None:
    big = make_message(body="Eine lange Beschreibung der Wohnung.\n" * 3000)  # ~110 KB
    await relay.send(big)
    [received] = await relay.sink.expect(1)
    assert b"Eine lange Beschreibung" in received.data
    async with relay.relay.db.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
    assert message.size > 64 * 1024
    assert await inline_rows(relay.relay.db) == {}
    [file] = files_in(relay.settings.storage.path)
    assert file.name == message.blob


async def test_with_the_limit_at_zero_every_blob_is_a_file(relay_factory: StartRelay) -> None:
    relay = await relay_factory(storage={"inline_max_bytes": 0})
    await relay.send(make_message())
    await relay.sink.expect(1)
    assert await inline_rows(relay.relay.db) == {}
    assert len(files_in(relay.settings.storage.path)) == 1


async def test_the_copy_without_control_headers_is_inline_too(relay: Harness) -> None:
    """The original keeps the agent's X-Sealrelay-* fields; the copies start from a second
    blob without them. Both are rows, and the copy sent is the second."""
    message = make_message()
    message["X-Sealrelay-Language"] = "de"
    await relay.send(message)
    [received] = await relay.sink.expect(1)
    assert b"X-Sealrelay-Language" not in received.data
    stored = await inline_rows(relay.relay.db)
    assert len(stored) == 2
    assert files_in(relay.settings.storage.path) == []


def test_the_limit_is_checked_with_a_clear_error(tmp_path: Path) -> None:
    for wrong in (2 * 1024 * 1024, "2MiB"):
        with pytest.raises(ValidationError, match=r"must be from 0 .* to 1048576 bytes"):
            relay_settings(tmp_path, 25, storage={"inline_max_bytes": wrong})
    with pytest.raises(ValidationError, match="byte_size"):  # no size at all
        relay_settings(tmp_path, 25, storage={"inline_max_bytes": -1})
    assert Settings().storage.inline_max_bytes == 64 * 1024


async def test_check_config_names_a_wrong_limit(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f"[storage]\npath = '{tmp_path}/blobs'\ninline_max_bytes = 5000000\n")
    run = await sealrelay("check-config", str(config))
    assert run.code == 1
    assert (
        "Error: config error: storage.inline_max_bytes: must be from 0 (every blob a file) to"
        " 1048576 bytes (1 MiB)"
    ) in run.err


async def test_reads_find_inline_blobs_and_files_alike(
    store: InlineBlobStore, database: Database
) -> None:
    small = b"Subject: hi\r\n\r\nsmall\r\n"
    digest = hashlib.sha256(small).hexdigest()
    await group_commit.insert(database, [], [], datetime.now(UTC), {digest: small})
    big = os.urandom(100_000)
    file_digest = await store.put(big)
    assert await store.read(digest) == small
    assert await store.read_start(digest, 9) == small[:9]
    assert await store.size(digest) == len(small)
    assert await store.exists(digest)
    async with store.open(digest) as blob:
        assert blob.size == len(small)
        assert await blob.read(4, 3) == small[4:7]
        assert b"".join([c async for c in blob.stream(0, blob.size, 5)]) == small
        assert blob.kernel_file() is None
    assert await store.read(file_digest) == big
    assert await store.read_start(file_digest, 10) == big[:10]
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not await store.exists(missing)
    with pytest.raises(BlobMissing):
        await store.read(missing)
    with pytest.raises(ValueError):
        await store.read("../etc/passwd")


async def test_a_file_opened_again_is_opened_from_the_files_and_from_the_table_once_gone(
    store: InlineBlobStore, database: Database, tmp_path: Path
) -> None:
    """A download link's file is opened from the files without a look in the table once it
    was found there; should the file go while the same bytes are a row, the row serves."""
    data = os.urandom(1000)
    digest = await store.put(data)
    for _ in range(2):
        async with store.open(digest) as blob:
            assert await blob.read(0, blob.size) == data
    await group_commit.insert(database, [], [], datetime.now(UTC), {digest: data})
    await store.files.delete(digest)
    for _ in range(2):
        async with store.open(digest) as blob:
            assert blob.kernel_file() is None  # the row's bytes, not a file
            assert await blob.read(0, blob.size) == data
    async with database.transaction() as session:
        await session.execute(delete(InlineBlob).where(InlineBlob.digest == digest))
    with pytest.raises(BlobMissing):
        async with store.open(digest):
            pass


async def test_where_names_the_table_for_a_row_and_the_file_for_a_file(
    store: InlineBlobStore, database: Database, tmp_path: Path
) -> None:
    small = b"Subject: hi\r\n\r\nsmall\r\n"
    digest = hashlib.sha256(small).hexdigest()
    await group_commit.insert(database, [], [], datetime.now(UTC), {digest: small})
    file_digest = await store.put(os.urandom(100_000))
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert await store.where(digest) == f"database table inline_blobs, digest {digest}"
    assert await store.where(file_digest) == store.location(file_digest)
    assert Path(store.location(file_digest)).is_file()
    assert await store.where(missing) == store.location(missing)  # where it would be
    with pytest.raises(ValueError):
        await store.where("../etc/passwd")


async def test_a_blob_is_read_while_the_reader_holds_a_transaction(
    store: InlineBlobStore, database: Database
) -> None:
    """Desks read a held original with their row locked; on SQLite the one connection is
    then taken, and the read must not wait for it."""
    data = b"Subject: held\r\n\r\n"
    digest = hashlib.sha256(data).hexdigest()
    await group_commit.insert(database, [], [], datetime.now(UTC), {digest: data})
    async with database.transaction() as session:
        await session.execute(select(Message).with_for_update())
        assert await store.read(digest) == data


async def test_the_sweeper_deletes_an_unreferenced_small_blob_and_keeps_a_referenced_one(
    store: InlineBlobStore, database: Database, tmp_path: Path
) -> None:
    await submit(database, store, SMALL, START, tmp_path)
    async with database.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
    orphan = b"left by an intake that never committed"
    orphan_digest = digest_of(orphan)
    young = b"stored a day ago, named by nothing yet"
    young_digest = digest_of(young)
    async with database.transaction() as session:
        connection = await session.connection()
        await connection.run_sync(
            lambda c: inline_blobs.insert(c, [(orphan_digest, orphan, START)])
        )
        await connection.run_sync(
            lambda c: inline_blobs.insert(c, [(young_digest, young, START + timedelta(days=9))])
        )
    assert set(await inline_rows(database)) == {message.blob, orphan_digest, young_digest}

    report = await sweeper.sweep(database, store, START + timedelta(days=10), GRACE)
    assert (report.blobs_deleted, report.bytes_freed) == (1, len(orphan))
    assert set(await inline_rows(database)) == {message.blob, young_digest}
    assert await store.exists(message.blob)
    assert not await store.exists(orphan_digest)


async def test_a_put_after_the_sweepers_look_spares_the_blob(
    store: InlineBlobStore, database: Database
) -> None:
    """The sweeper listed an old row nothing named; an intake then commits a message with
    the same bytes. Its insert makes the row young, so the sweeper's delete leaves it."""
    data = b"the same small bytes, sent again"
    digest = hashlib.sha256(data).hexdigest()
    await group_commit.insert(database, [], [], START, {digest: data})
    listed = [info async for info in store.list()]
    assert [(i.digest, i.written_at) for i in listed] == [(digest, START)]
    await group_commit.insert(database, [], [], START + timedelta(days=30), {digest: data})
    assert await store.delete_stale(digest, START + timedelta(days=23)) is None
    assert await store.read(digest) == data
    assert await store.delete_stale(digest, START + timedelta(days=31)) == len(data)
    assert not await store.exists(digest)


async def test_a_blob_both_inline_and_a_file_is_listed_and_swept_in_both_places(
    store: InlineBlobStore, database: Database
) -> None:
    data = b"put as a file by a materializer, inline from an intake"
    digest = await store.put(data)
    await group_commit.insert(database, [], [], START, {digest: data})
    assert [info.digest async for info in store.list()] == [digest, digest]
    report = await sweeper.sweep(database, store, datetime.now(UTC) + timedelta(days=30), GRACE)
    assert report.blobs_deleted == 2
    assert not await store.exists(digest)
    assert files_in(store.files.root) == []  # type: ignore[attr-defined]


async def test_a_failed_unit_leaves_no_inline_blob(database: Database) -> None:
    """A unit that fails after inserting its blob rolls the blob back with its rows, alone
    and in a group with others that commit (each then in its own savepoint)."""
    bad, good = b"never committed", b"committed beside it"

    def failing(connection: Connection) -> group_commit.Done[None]:
        inline_blobs.insert(connection, [(digest_of(bad), bad, START)])
        raise RuntimeError("the unit failed after its blob")

    with pytest.raises(RuntimeError):
        await group_commit.submit(database, failing)
    assert await inline_rows(database) == {}

    results = await asyncio.gather(
        group_commit.submit(database, failing),
        group_commit.insert(database, [], [], START, {digest_of(good): good}),
        return_exceptions=True,
    )
    assert isinstance(results[0], RuntimeError)
    assert results[1] is None
    assert await inline_rows(database) == {digest_of(good): good}


async def test_a_relay_reads_small_blobs_kept_before_the_limit_was_lowered(
    relay_factory: StartRelay, database: Database
) -> None:
    """Lowering inline_max_bytes changes where new blobs go; old rows are still read."""
    data = b"From: a@b\r\n\r\nkept inline before\r\n"
    digest = hashlib.sha256(data).hexdigest()
    await group_commit.insert(database, [], [], datetime.now(UTC), {digest: data})
    relay = await relay_factory(storage={"inline_max_bytes": 0})
    assert not relay.relay.blobs.takes_inline(1)
    assert await relay.relay.blobs.read(digest) == data


async def test_small_blobs_over_s3_never_reach_the_bucket(
    database: Database, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = InlineBlobStore(database, s3_server.store(s3_bucket, "relay"), 64 * 1024)
    await submit(database, store, SMALL, START, tmp_path)
    async with database.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
        count = await session.scalar(select(func.count()).select_from(InlineBlob))
    assert count == 1
    assert [info.digest async for info in store.files.list()] == []
    assert await store.read(message.blob) == SMALL
    big = offer(100_000)
    await submit(database, store, big, START, tmp_path)
    assert hashlib.sha256(big).hexdigest() in [info.digest async for info in store.files.list()]
    await store.close()


async def test_the_same_bytes_from_several_messages_of_one_group_commit_are_one_row(
    store: InlineBlobStore, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends one message again at once: the group commit carries both, and one
    statement may not write a row twice, so each digest goes in once, at the later time."""
    await submit(database, store, SMALL, START, tmp_path)  # the agent's row first
    later = START + timedelta(minutes=1)
    await asyncio.gather(*(submit(database, store, SMALL, later, tmp_path) for _ in range(8)))
    async with database.transaction() as session:
        messages = (await session.scalars(select(Message))).all()
        [(written_at,)] = (await session.execute(select(InlineBlob.written_at))).all()
    assert len(messages) == 9 and len({m.blob for m in messages}) == 1
    assert written_at.replace(tzinfo=UTC) == later
    assert await store.read(messages[0].blob) == SMALL
    assert "each unit again on its own" not in caplog.text  # no batch failed over it


class CountedReads:
    """The store's reads of its table, counted."""

    def __init__(self, reads: Any) -> None:
        self.reads = reads
        self.count = 0

    async def value(self, column: str, digest: str) -> Any:
        self.count += 1
        return await self.reads.value(column, digest)


def counted(store: InlineBlobStore) -> CountedReads:
    reads = store._reads = CountedReads(store._reads)
    return reads


async def test_the_intakes_small_originals_are_read_back_without_a_query(
    store: InlineBlobStore, database: Database, tmp_path: Path
) -> None:
    """Delivery reads a small message's original moments after its commit: from memory,
    not with a query and a pooled connection each."""
    await submit(database, store, SMALL, START, tmp_path)
    async with database.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
    reads = counted(store)
    assert await store.read(message.blob) == SMALL
    assert await store.size(message.blob) == len(SMALL)
    async with store.open(message.blob) as blob:
        assert await blob.read(0, blob.size) == SMALL
    assert reads.count == 0
    assert await inline_rows(database) == {message.blob: SMALL}  # and durable in the table


async def test_the_originals_kept_in_memory_are_bounded(
    store: InlineBlobStore, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inline_blobs, "RECENT_BYTES", 100)
    blobs = {digest_of(data): data for data in (b"a" * 40, b"b" * 40, b"c" * 40)}
    for digest, data in blobs.items():
        await group_commit.insert(database, [], [], START, {digest: data})
        store.committed_inline({digest: data})
    reads = counted(store)
    first, *rest = blobs
    for digest in rest:
        assert await store.read(digest) == blobs[digest]
    assert reads.count == 0
    assert await store.read(first) == blobs[first]  # forgotten, read from the table
    assert reads.count == 1


@pytest.mark.parametrize("how", ["delete", "delete_stale"])
async def test_a_deleted_blob_is_not_read_from_memory(
    store: InlineBlobStore, database: Database, tmp_path: Path, how: str
) -> None:
    await submit(database, store, SMALL, START, tmp_path)
    digest = digest_of(SMALL)
    if how == "delete":
        await store.delete(digest)
    else:
        assert await store.delete_stale(digest, START + timedelta(days=1)) == len(SMALL)
    assert not await store.exists(digest)
    with pytest.raises(BlobMissing):
        await store.read(digest)
