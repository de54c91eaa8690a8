"""The IAM policy docs/object-storage.md gives is enough for everything the relay does in a
bucket, and a policy with less is caught by the probe, naming what was refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.store.blobs import BlobMissing
from gateway.store.s3_blobs import PART_SIZE, S3StoreError
from tests.s3_server import S3Server

DOCS = Path(__file__).parents[2] / "docs" / "object-storage.md"


def documented_policy(bucket: str, prefix: str) -> dict[str, Any]:
    [block] = re.findall(r"```json\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    text = block.replace("sealrelay-blobs", bucket).replace("/prod/", f"/{prefix}/")
    policy: dict[str, Any] = json.loads(text)
    return policy


async def test_the_documented_policy_allows_all_the_relay_does(
    s3_server: S3Server, s3_bucket: str
) -> None:
    client = s3_server.client()
    client.create_multipart_upload(Bucket=s3_bucket, Key="relay/" + "c" * 64)  # a stale one
    with s3_server.refusing_unknown_keys(documented_policy(s3_bucket, "relay")) as (key, secret):
        store = s3_server.store(s3_bucket, "relay", access_key_id=key, secret_access_key=secret)
        try:
            await store.probe()
            big = os.urandom(PART_SIZE + 1000)
            small_digest, big_digest = await store.put(b"small"), await store.put(big)
            assert await store.put(big) == big_digest  # the copy onto itself
            assert await store.read(big_digest) == big
            async with store.open(big_digest) as blob:
                assert b"".join([c async for c in blob.stream(10, 1000)]) == big[10:1010]
            assert {info.digest async for info in store.list()} == {small_digest, big_digest}
            await store.delete(small_digest)
            with pytest.raises(BlobMissing):
                await store.read(small_digest)
            assert await store.remove_interrupted_writes() == 1
        finally:
            await store.close()


async def test_a_policy_without_delete_fails_the_probe(s3_server: S3Server, s3_bucket: str) -> None:
    policy = documented_policy(s3_bucket, "relay")
    policy["Statement"][1]["Action"].remove("s3:DeleteObject")
    with s3_server.refusing_unknown_keys(policy) as (key, secret):
        store = s3_server.store(s3_bucket, "relay", access_key_id=key, secret_access_key=secret)
        try:
            with pytest.raises(S3StoreError, match=r"cannot delete s3://.*/relay/: access denied"):
                await store.probe()
            outside = s3_server.store(
                s3_bucket, "other", access_key_id=key, secret_access_key=secret
            )
            with pytest.raises(S3StoreError, match="access denied"):
                await outside.put(b"not under the allowed prefix")
            await outside.close()
        finally:
            await store.close()
