"""What the S3 store does beyond the blob contract, against a real S3-compatible server:
big blobs in parts, ranged reads, failures as S3StoreError, the sweep, stale uploads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import users
from gateway.intake.pipeline import Envelope, Origin, Pipeline
from gateway.store import s3_blobs, sweeper
from gateway.store.blobs import BlobMissing, HashedFile
from gateway.store.db import Database
from gateway.store.models import Message, StoredFile
from gateway.store.s3_blobs import PART_SIZE, S3BlobStore, S3StoreError
from gateway.users import Agent
from tests.conftest import AGENT, relay_settings
from tests.s3_server import S3Server
from tests.store.test_sweeper import offer

MIB = 1024 * 1024
MOTO_INITIATED = datetime(2010, 11, 10, 20, 48, 33, tzinfo=UTC)  # every upload's, in moto


@pytest.fixture
async def store(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> AsyncIterator[S3BlobStore]:
    opened = s3_server.store(s3_bucket, "relay", spool_directory=tmp_path)
    yield opened
    await opened.close()


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


def uploads(server: S3Server, bucket: str) -> list[str]:
    return [
        u["Key"] for u in server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    ]


async def test_a_big_blob_goes_up_in_parts_and_reads_back_by_range(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART_SIZE + 12345)
    digest = await store.put_stream(chunks(data))
    assert digest == hashlib.sha256(data).hexdigest()
    stored = s3_server.client().head_object(Bucket=s3_bucket, Key=f"relay/{digest}")
    assert stored["ETag"].endswith('-3"')  # three parts, as S3 marks a multipart object
    assert stored["ContentLength"] == len(data)
    assert uploads(s3_server, s3_bucket) == []

    async with store.open(digest) as blob:
        assert blob.size == len(data)
        across = PART_SIZE - 100
        assert await blob.read(across, 200) == data[across : across + 200]
        streamed = [c async for c in blob.stream(across, PART_SIZE + 500, chunk_size=MIB)]
        assert b"".join(streamed) == data[across : across + PART_SIZE + 500]
        assert max(map(len, streamed)) <= MIB
        with pytest.raises(OSError, match="early"):
            [c async for c in blob.stream(len(data) - 10, 20)]
    assert await store.read(digest) == data


async def test_a_spooled_message_goes_up_in_parts_from_its_own_file(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(PART_SIZE + 4321)
    digest = hashlib.sha256(data).hexdigest()
    with open(tmp_path / "spooled", "w+b") as file:
        file.write(data)
        file.flush()
        assert await store.put_file(HashedFile(file.fileno(), digest, len(data))) == digest
        stored = s3_server.client().head_object(Bucket=s3_bucket, Key=f"relay/{digest}")
        assert stored["ETag"].endswith('-2"')
        assert await store.read(digest) == data
        with pytest.raises(OSError, match="ended at byte"):  # shorter than its writer said
            await store.put_file(HashedFile(file.fileno(), "0" * 64, len(data) + PART_SIZE))
    assert uploads(s3_server, s3_bucket) == []
    assert not await store.exists("0" * 64)


async def test_only_a_blob_over_a_mebibyte_is_spooled_to_disk(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = s3_server.store(s3_bucket, spool_directory=tmp_path / "not there")
    small = os.urandom(s3_blobs.MEMORY_SPOOL)
    assert await store.read(await store.put_stream(chunks(small))) == small
    with pytest.raises(FileNotFoundError):
        await store.put_stream(chunks(small + b"1"))
    assert [info.digest async for info in store.list()] == [hashlib.sha256(small).hexdigest()]
    await store.close()


async def test_a_small_blob_is_one_object(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str
) -> None:
    data = os.urandom(PART_SIZE)  # the largest that goes in one request
    digest = await store.put_stream(chunks(data, MIB))
    stored = s3_server.client().head_object(Bucket=s3_bucket, Key=f"relay/{digest}")
    assert "-" not in stored["ETag"]
    assert stored["ETag"].strip('"') == hashlib.md5(data).hexdigest()


async def test_a_big_blob_put_again_is_young_again_without_a_new_upload(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str
) -> None:
    data = os.urandom(PART_SIZE + 1)
    digest = await store.put(data)
    s3_server.set_written_at(s3_bucket, f"relay/{digest}", datetime.now(UTC) - timedelta(days=30))
    before = datetime.now(UTC) - timedelta(seconds=2)
    assert await store.put_stream(chunks(data)) == digest
    [info] = [info async for info in store.list()]
    assert info.written_at >= before
    assert info.size == len(data)
    assert await store.read(digest) == data


async def test_a_failed_multipart_upload_is_aborted(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts under S3's 5 MiB minimum: the server refuses to complete the upload.
    monkeypatch.setattr(s3_blobs, "PART_SIZE", MIB)
    data = os.urandom(3 * MIB)
    with pytest.raises(S3StoreError, match="EntityTooSmall"):
        await store.put(data)
    assert uploads(s3_server, s3_bucket) == []
    assert not await store.exists(hashlib.sha256(data).hexdigest())


async def test_a_cancelled_put_leaves_no_upload_behind(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str
) -> None:
    started = asyncio.Event()
    real_client = await store._client()
    upload_part = real_client.upload_part

    async def first_part_then_wait(**kwargs: object) -> object:
        result = await upload_part(**kwargs)  # type: ignore[arg-type]
        started.set()
        await asyncio.Event().wait()  # the put hangs here until cancelled
        return result

    real_client.upload_part = first_part_then_wait  # type: ignore[method-assign]
    put = asyncio.create_task(store.put(os.urandom(PART_SIZE + 10)))
    await started.wait()
    assert len(uploads(s3_server, s3_bucket)) == 1
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert uploads(s3_server, s3_bucket) == []


async def test_list_names_only_blobs_under_the_prefix(
    store: S3BlobStore, s3_server: S3Server, s3_bucket: str
) -> None:
    digest = await store.put(b"a blob")
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="relay/notes.txt", Body=b"not a blob")
    client.put_object(Bucket=s3_bucket, Key=hashlib.sha256(b"x").hexdigest(), Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="relay-old/" + digest, Body=b"a blob")
    assert [info.digest async for info in store.list()] == [digest]
    assert store.location(digest) == f"s3://{s3_bucket}/relay/{digest}"


async def test_only_stale_multipart_uploads_are_aborted(
    s3_server: S3Server, s3_bucket: str
) -> None:
    client = s3_server.client()
    client.create_multipart_upload(Bucket=s3_bucket, Key="relay/" + "a" * 64)
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/file")

    # An hour after it started, an upload may be a writer at work: it stays.
    young = s3_server.store(s3_bucket, "relay", clock=lambda: MOTO_INITIATED + timedelta(hours=1))
    assert await young.remove_interrupted_writes() == 0
    await young.close()
    assert sorted(uploads(s3_server, s3_bucket)) == ["elsewhere/file", "relay/" + "a" * 64]

    store = s3_server.store(s3_bucket, "relay")
    assert await store.remove_interrupted_writes() == 1
    assert uploads(s3_server, s3_bucket) == ["elsewhere/file"]  # not under the prefix: not ours
    assert await store.remove_interrupted_writes() == 0
    await store.close()


async def test_a_sweep_deletes_unneeded_blobs_and_stale_uploads(
    database: Database, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The real intake stores a mail with a linked file in the bucket; the sweep keeps
    what rows name and deletes the file once its link is long expired."""
    store = s3_server.store(s3_bucket, "relay")
    now = datetime.now(UTC)
    settings = relay_settings(tmp_path, 25)
    pipeline = Pipeline(settings, database, store, clock=lambda: now)
    user = await users.add_user(database, AGENT, "a long password")
    await pipeline.submit(
        Envelope(AGENT, ("p@example.com",)),
        offer(3 * MIB),
        Agent(user.id, AGENT, None, False, frozenset([AGENT])),
        Origin("test", "127.0.0.1", "TEST"),
    )
    async with database.transaction() as session:
        [stored] = (await session.scalars(select(StoredFile))).all()
        [message] = (await session.scalars(select(Message))).all()
    orphan = await store.put(b"left by an intake that never committed")
    s3_server.client().create_multipart_upload(Bucket=s3_bucket, Key="relay/" + "b" * 64)

    report = await sweeper.sweep(database, store, now + timedelta(days=99), timedelta(days=7))
    assert report.blobs_deleted == 2
    assert not await store.exists(stored.sha256)
    assert not await store.exists(orphan)
    assert await store.exists(message.blob)
    assert uploads(s3_server, s3_bucket) == []
    await store.close()


async def test_a_missing_bucket_is_an_error_not_a_missing_blob(s3_server: S3Server) -> None:
    store = s3_server.store("no-such-bucket", "relay")
    digest = hashlib.sha256(b"x").hexdigest()
    for call in (
        lambda: store.put(b"x"),
        lambda: store.put(os.urandom(PART_SIZE + 1)),
        lambda: store.exists(digest),
        lambda: store.size(digest),
        lambda: store.read(digest),
        lambda: store.probe(),
    ):
        with pytest.raises(S3StoreError, match="bucket does not exist") as raised:
            await call()
        assert not isinstance(raised.value, BlobMissing)
        assert isinstance(raised.value, OSError)  # callers treat it as disk trouble
    with pytest.raises(S3StoreError, match="bucket does not exist"):
        [info async for info in store.list()]
    await store.close()


async def test_wrong_credentials_are_an_error(s3_server: S3Server, s3_bucket: str) -> None:
    with s3_server.refusing_unknown_keys() as (key_id, secret):
        good = s3_server.store(s3_bucket, "relay", access_key_id=key_id, secret_access_key=secret)
        digest = await good.put(b"stored with the right key")
        unknown = s3_server.store(s3_bucket, "relay", access_key_id="AKIANOTKNOWN")
        wrong = s3_server.store(
            s3_bucket, "relay", access_key_id=key_id, secret_access_key="not the secret"
        )
        with pytest.raises(S3StoreError, match="access key is not known"):
            await unknown.put(b"x")
        with pytest.raises(S3StoreError, match="secret access key is wrong"):
            await wrong.put(b"x")
        with pytest.raises(S3StoreError):
            await wrong.read(digest)
        assert await good.read(digest) == b"stored with the right key"
        for store in (good, unknown, wrong):
            await store.close()


async def test_an_unreachable_endpoint_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = S3BlobStore(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=1,
    )
    with pytest.raises(S3StoreError, match="cannot put s3://bucket/"):
        await store.put(b"x")
    await store.close()
