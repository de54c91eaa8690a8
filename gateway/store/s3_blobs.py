"""The blob store as an S3 bucket (AWS S3, MinIO, Garage, Ceph RGW): `prefix/<sha256>`.

A put spools its bytes (in memory while small, else an anonymous temp file) and hashes them
on the way, because the key is the digest and S3 wants the key before the bytes. Then one
PutObject up to PART_SIZE, a multipart upload above it; a multipart upload that fails is
aborted, and uploads a killed writer left are aborted at start-up and by each sweep once they
are a day old. S3 says an object is durable when the request returns, so the store keeps
the contract of gateway/store/blobs.py: a digest is returned only for a whole blob.

A put of bytes already stored must make the blob young again (LastModified is its age):
a small blob is simply written again, a big one copied onto itself, which S3 does
without moving its bytes through the relay.

Reads are ranged GETs, so downloads and HTTP Range requests stream from the bucket and the
relay never holds a whole blob. S3's "no such key" raises BlobMissing; every other failure
of S3 or of the way to it (refused connections, timeouts, 5xx, throttling, refused
credentials, a missing bucket) raises S3StoreError, a StoreUnavailable: the blob's fate is
then unknown, and callers answer "try again later", as they do for a disk in trouble.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from gateway.store.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobMissing,
    BlobReader,
    BlobStore,
    HashedFile,
    StoreUnavailable,
    checked_digest,
    is_digest,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from gateway.config import StorageSettings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_SIZE = 8 * MIB  # a blob up to this size is one PutObject; bigger ones go in parts of it
MEMORY_SPOOL = 1 * MIB  # a put keeps this much in memory before it spools to a temp file
COPY_LIMIT = 5 * 1024 * MIB  # the biggest object CopyObject takes in one request
STALE_UPLOAD = timedelta(days=1)
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}

AddressingStyle = Literal["auto", "virtual", "path"]


@functools.cache
def _session() -> AioSession:
    """One session for every store: it caches S3's service model, slow to load."""
    return AioSession()


class S3StoreError(StoreUnavailable):
    """S3 refused or could not be reached: the bucket's counterpart of a disk error."""


def s3_store(storage: StorageSettings, **options: Any) -> S3BlobStore:
    """The store `[storage]` names (its url is s3://); `options` as for S3BlobStore.
    OSError if the secret key file cannot be read."""
    if storage.bucket is None:
        raise ValueError(f"storage.url {storage.url!r} is not an s3:// URL")
    secret = None
    if storage.secret_access_key_file is not None:
        secret = storage.secret_access_key_file.read_text(encoding="utf-8").strip()
    return S3BlobStore(
        storage.bucket,
        storage.prefix,
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        addressing_style=storage.addressing_style,
        access_key_id=storage.access_key_id,
        secret_access_key=secret,
        **options,
    )


class S3BlobStore(BlobStore):
    """Blobs as objects `prefix + digest` in one bucket; see the module for how."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: AddressingStyle = "auto",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_connections: int = 64,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        max_attempts: int = 3,
        spool_directory: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self._client_options: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "config": AioConfig(
                s3={"addressing_style": addressing_style},
                max_pool_connections=max_connections,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            ),
        }
        self._spool_directory = spool_directory
        self._clock = clock
        self._s3: S3Client | None = None
        self._exits = AsyncExitStack()
        self._opening = asyncio.Lock()

    def _key(self, digest: str) -> str:
        return self.prefix + checked_digest(digest)

    async def _client(self) -> S3Client:
        """The client, made on first use: it belongs to the event loop that uses it."""
        if self._s3 is None:
            async with self._opening:
                if self._s3 is None:
                    creator = _session().create_client("s3", **self._client_options)
                    self._s3 = await self._exits.enter_async_context(creator)
        return self._s3

    async def close(self) -> None:
        self._s3 = None
        await self._exits.aclose()

    # -- writing

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        hasher = hashlib.sha256()
        with _Spool(self._spool_directory) as spool:
            async for chunk in chunks:
                hasher.update(chunk)
                await spool.write(chunk)
            digest = hasher.hexdigest()
            if spool.size <= PART_SIZE:
                await self._put_object(digest, await spool.read(0, spool.size))
            elif not await self._refresh(digest, spool.size):
                await self._upload_in_parts(digest, spool)
        return digest

    async def put_file(self, file: HashedFile) -> str:
        """Uploaded from the file itself: its digest is known, so no spool of our own."""
        digest = checked_digest(file.digest)
        parts = _FileParts(file)
        if file.size <= PART_SIZE:
            await self._put_object(digest, await parts.read(0, file.size))
        elif not await self._refresh(digest, file.size):
            await self._upload_in_parts(digest, parts)
        return digest

    async def _put_object(self, digest: str, data: bytes) -> None:
        s3 = await self._client()
        with self._errors("put", digest):
            await s3.put_object(Bucket=self.bucket, Key=self._key(digest), Body=data)

    async def _refresh(self, digest: str, size: int) -> bool:
        """Whether a big blob is stored already; if so it is young again, as after a put."""
        stored = await self._head(digest)
        if stored is None or stored != size or size > COPY_LIMIT:
            return False
        s3 = await self._client()
        key = self._key(digest)
        try:
            with self._errors("refresh", digest):
                await s3.copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="REPLACE",
                    Metadata={"refreshed": self._clock().isoformat()},
                )
        except BlobMissing:
            return False  # a sweeper took it meanwhile: upload it again
        return True

    async def _upload_in_parts(self, digest: str, spool: _Spool | _FileParts) -> None:
        s3 = await self._client()
        key = self._key(digest)
        with self._errors("start upload of", digest):
            started = await s3.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = started["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, spool.size, PART_SIZE), 1):
                data = await spool.read(start, PART_SIZE)
                with self._errors("upload part of", digest):
                    sent = await s3.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                    )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            with self._errors("complete upload of", digest):
                await s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        """Drop an upload's parts; one left behind goes with the next sweep anyway."""
        s3 = await self._client()
        try:
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not abort the upload of %s (the sweep will): %s", key, exc)

    async def remove_interrupted_writes(self) -> int:
        """Abort multipart uploads started over a day ago under the prefix: a writer that
        was killed left them, since no live put takes that long (each sweep calls this)."""
        s3 = await self._client()
        cutoff = self._clock() - STALE_UPLOAD
        aborted = 0
        with self._errors("list the uploads in", None):
            async for page in s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            ):
                for upload in page.get("Uploads", []):
                    if "Initiated" in upload and upload["Initiated"] >= cutoff:
                        continue
                    if await self._abort_stale(upload["Key"], upload["UploadId"]):
                        aborted += 1
        if aborted:
            log.info("aborted %d multipart upload(s) an interrupted put left", aborted)
        return aborted

    async def _abort_stale(self, key: str, upload_id: str) -> bool:
        """Whether this call aborted the upload (two sweepers may race to it)."""
        s3 = await self._client()
        try:
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                return False
            raise
        return True

    # -- reading

    async def _head(self, digest: str) -> int | None:
        """The blob's size, None if it is not stored."""
        s3 = await self._client()
        try:
            with self._errors("look up", digest):
                return (await s3.head_object(Bucket=self.bucket, Key=self._key(digest)))[
                    "ContentLength"
                ]
        except BlobMissing:
            await self._check_bucket()
            return None

    async def _check_bucket(self) -> None:
        """S3StoreError if the bucket is gone: a HEAD answers a bare 404 for a missing key
        and for a missing bucket alike, and only the first means a blob is missing. A list
        says NoSuchBucket in words (and needs only s3:ListBucket, which the sweep needs)."""
        s3 = await self._client()
        with self._errors("read", None):
            await s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        size = await self.size(digest)
        yield S3BlobReader(self, digest, size)

    async def read(self, digest: str) -> bytes:
        """The whole blob in one GET (no HEAD first): a GET names a missing key and a
        missing bucket apart, as a HEAD cannot."""
        s3 = await self._client()
        with self._errors("read", digest):
            body = (await s3.get_object(Bucket=self.bucket, Key=self._key(digest)))["Body"]
            try:
                data: bytes = await body.read()
            finally:
                body.close()
        return data

    async def size(self, digest: str) -> int:
        size = await self._head(digest)
        if size is None:
            raise BlobMissing(digest)
        return size

    async def exists(self, digest: str) -> bool:
        return await self._head(digest) is not None

    async def delete(self, digest: str) -> None:
        s3 = await self._client()
        with self._errors("delete", digest):
            await s3.delete_object(Bucket=self.bucket, Key=self._key(digest))

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        """A HEAD for the age, then the DELETE: S3 has no delete-if-unmodified, so a put
        that lands between the two (one round trip) is still lost; the sweeper keeps that
        window to bytes nothing names and nothing put for the whole grace period."""
        s3 = await self._client()
        try:
            with self._errors("look up", digest):
                head = await s3.head_object(Bucket=self.bucket, Key=self._key(digest))
        except BlobMissing:
            return None
        if head["LastModified"].astimezone(UTC) >= written_before:
            return None
        await self.delete(digest)
        return head["ContentLength"]

    async def list(self) -> AsyncIterator[BlobInfo]:
        s3 = await self._client()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        with self._errors("list", None):
            async for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(self.prefix) :]
                    if is_digest(name):
                        written = entry["LastModified"].astimezone(UTC)
                        yield BlobInfo(name, entry["Size"], written)

    def location(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self._key(digest)}"

    async def check(self) -> None:
        """A list of one key under the prefix: the bucket is there and takes this key."""
        s3 = await self._client()
        with self._errors("list", None):
            await s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    async def probe(self) -> None:
        """List, write and delete under the prefix, as the relay will: S3StoreError says
        which of them failed and why (check-config runs this before the relay starts)."""
        s3 = await self._client()
        key = f"{self.prefix}sealrelay-check"
        with self._errors("list", None):
            await s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        with self._errors("write", None):
            await s3.put_object(Bucket=self.bucket, Key=key, Body=b"")
        with self._errors("delete", None):
            await s3.delete_object(Bucket=self.bucket, Key=key)

    async def _range(self, digest: str, start: int, end: int) -> Any:
        """The response body of bytes start..end (inclusive) of a blob."""
        s3 = await self._client()
        with self._errors("read", digest):
            response = await s3.get_object(
                Bucket=self.bucket, Key=self._key(digest), Range=f"bytes={start}-{end}"
            )
        return response["Body"]

    @contextmanager
    def _errors(self, action: str, digest: str | None) -> Iterator[None]:
        """S3's failures as BlobMissing (no such key) or S3StoreError (everything else)."""
        where = self.location(digest) if digest else f"s3://{self.bucket}/{self.prefix}"
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            if digest is not None and code in _NOT_FOUND:
                raise BlobMissing(digest) from exc
            raise S3StoreError(_explained(action, where, code, error.get("Message"))) from exc
        except (BotoCoreError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            # the last three: a response body cut off while it streams
            raise S3StoreError(f"cannot {action} {where}: {exc}") from exc


_EXPLAINED = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is not known there",
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "AccessDenied": "access denied (docs/object-storage.md lists the permissions needed)",
    "403": "access denied (docs/object-storage.md lists the permissions needed)",
}


def _explained(action: str, where: str, code: str, message: str | None) -> str:
    why = _EXPLAINED.get(code) or (f"{code}: {message}" if message else code)
    return f"cannot {action} {where}: {why}"


class S3BlobReader(BlobReader):
    """A stored blob read by ranged GETs; its bytes never change, it is content-addressed."""

    def __init__(self, store: S3BlobStore, digest: str, size: int) -> None:
        self._store = store
        self._digest = digest
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, length: int) -> bytes:
        end = min(start + length, self._size)
        if start >= end:
            return b""
        body = await self._store._range(self._digest, start, end - 1)
        try:
            with self._store._errors("read", self._digest):
                data: bytes = await body.read()
        finally:
            body.close()
        if len(data) != end - start:  # a connection cut mid-answer can end the body quietly
            where = self._store.location(self._digest)
            raise S3StoreError(f"cannot read {where}: the answer ended after {len(data)} bytes")
        return data

    async def stream(
        self, start: int, length: int, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """One GET for the whole range, passed on as it arrives: a download costs one
        request, and memory stays at a chunk however big the blob."""
        end = start + length
        if end > self._size:
            raise OSError(f"blob ended {end - self._size} bytes early")
        if length <= 0:
            return
        body = await self._store._range(self._digest, start, end - 1)
        try:
            position = start
            while position < end:
                with self._store._errors("read", self._digest):
                    chunk: bytes = await body.read(min(chunk_size, end - position))
                if not chunk:
                    raise OSError(f"blob ended {end - position} bytes early")
                position += len(chunk)
                yield chunk
        finally:
            body.close()


class _FileParts:
    """A HashedFile read as `_Spool` is, for the parts of an upload."""

    def __init__(self, file: HashedFile) -> None:
        self._fd = file.fd
        self.size = file.size

    async def read(self, start: int, length: int) -> bytes:
        data = await asyncio.to_thread(os.pread, self._fd, length, start)
        if len(data) != min(length, self.size - start):
            raise OSError(f"the file to upload ended at byte {start + len(data)}")
        return data


class _Spool:
    """The bytes of one put: in memory while small, else in an anonymous temp file that
    the kernel removes however the process ends."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.size <= MEMORY_SPOOL:
            self._memory += chunk
            return
        if self._file is None:
            self._file = await asyncio.to_thread(self._spill)
        await asyncio.to_thread(self._file.write, chunk)

    def _spill(self) -> IO[bytes]:
        file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 (closed on exit)
        file.write(self._memory)
        self._memory = bytearray()
        return file

    async def read(self, start: int, length: int) -> bytes:
        if self._file is None:
            return bytes(self._memory[start : start + length])
        file = self._file
        file.flush()
        return await asyncio.to_thread(os.pread, file.fileno(), length, start)
