"""End to end with blobs in S3: a big attachment becomes a link, its file goes to the bucket,
and the relay's web server streams it back from there, whole and by Range.

The relay is built from settings as `serve` builds it ([storage] url = "s3://…", the secret
from a file), against the S3-compatible server of tests/s3_server.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import aiohttp
import pytest

from gateway.store.health import WatchedBlobStore
from gateway.store.inline_blobs import InlineBlobStore
from gateway.store.s3_blobs import S3BlobStore
from tests.conftest import Harness, StartRelay
from tests.links.test_e2e_links import LINK, PDF, PROSPECT, bodies, offer
from tests.s3_server import KEY_ID, REGION, SECRET, S3Server
from tests.support import PERSON_UA


@pytest.fixture
async def relay(
    relay_factory: StartRelay, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> Harness:
    secret = tmp_path / "s3.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    return await relay_factory(
        smtp={"max_message_size": 50 * 1024 * 1024},
        storage={
            "url": f"s3://{s3_bucket}/relay/blobs",
            "endpoint_url": s3_server.endpoint_url,
            "region": REGION,
            "addressing_style": "path",
            "access_key_id": KEY_ID,
            "secret_access_key_file": str(secret),
        },
    )


async def test_a_linked_file_is_stored_in_s3_and_downloaded_from_it(
    relay: Harness, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    assert isinstance(relay.relay.blobs, InlineBlobStore)  # small mail in the database
    assert isinstance(relay.relay.blobs.files, WatchedBlobStore)  # its failures are told
    assert isinstance(relay.relay.blobs.files.store, S3BlobStore)
    await relay.send(offer(), recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    text, _ = bodies(copy.data)
    [token] = set(LINK.findall(text))

    digest = hashlib.sha256(PDF).hexdigest()
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    sizes = {entry["Key"]: entry["Size"] for entry in listed}
    assert sizes[f"relay/blobs/{digest}"] == len(PDF)
    assert all(key.startswith("relay/blobs/") for key in sizes)  # the mail, the file, …
    assert not (tmp_path / "blobs").exists() or not any((tmp_path / "blobs").rglob(digest))

    base = relay.web_url
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(f"{base}/d/{token}") as page:
            assert page.status == 200
            html_page = await page.text()
        [file_path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', html_page)
        async with http.get(f"{base}{file_path}") as download:
            assert download.status == 200
            assert download.headers["Accept-Ranges"] == "bytes"
            body = await download.read()
        assert hashlib.sha256(body).hexdigest() == digest

        middle = len(PDF) // 2
        async with http.get(
            f"{base}{file_path}", headers={"Range": f"bytes={middle}-{middle + 99_999}"}
        ) as part:
            assert part.status == 206
            assert part.headers["Content-Range"] == f"bytes {middle}-{middle + 99_999}/{len(PDF)}"
            assert await part.read() == PDF[middle : middle + 100_000]
        async with http.get(f"{base}{file_path}", headers={"Range": "bytes=-1000"}) as tail:
            assert tail.status == 206
            assert await tail.read() == PDF[-1000:]
