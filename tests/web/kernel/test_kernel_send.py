"""A linked file is sent by the kernel (os.sendfile, counted here as it still sends) from the
local store, on asyncio and on uvloop, byte for byte as streaming would; the S3 store and TLS
connections are streamed; a visitor leaving mid-file costs the server nothing that stays."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from tests.links.test_downloads import Clock, running_pages
from tests.store.test_blob_contract import STORES
from tests.support import PERSON_UA, free_port, make_certificate
from web.blobs import send_blob

MIB = 1024 * 1024


@pytest.fixture
def kernel_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts os.sendfile sent, whichever loop called it."""
    sent: list[int] = []
    real: Callable[..., int] = os.sendfile

    def counted(*args: Any) -> int:
        done = real(*args)
        sent.append(done)
        return done

    monkeypatch.setattr(os, "sendfile", counted)
    return sent


def open_files() -> list[str]:
    """What this process has open, by /proc/self/fd (a descriptor closed meanwhile left out)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            continue
    return found


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_whole_files_and_ranges_are_byte_exact(
    database: Database,
    tmp_path: Path,
    kind: str,
    kernel_sent: list[int],
    request: pytest.FixtureRequest,
) -> None:
    content = os.urandom(3 * MIB + 17)
    size = len(content)
    blobs = STORES[kind](request, tmp_path)
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link([("Exposé.pdf", "application/pdf", content)])
        stored = made.files[0]
        path = made.file_path(stored)
        delivered = 0

        response, body = await pages.get(path)
        assert response.status == 200 and body == content
        assert response.headers["Content-Length"] == str(size)
        assert response.headers["ETag"] == f'"{stored.sha256}"'
        assert "Content-Disposition" in response.headers
        delivered += len(body)

        for header, first, last in [
            ("bytes=0-0", 0, 0),
            ("bytes=1048570-", 1048570, size - 1),
            ("bytes=-100", size - 100, size - 1),
            ("bytes=5-2097151", 5, 2097151),
            (f"bytes={size - 1}-{size + 50}", size - 1, size - 1),
        ]:
            response, body = await pages.get(path, headers={"Range": header})
            assert response.status == 206, header
            assert body == content[first : last + 1], header
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
            delivered += len(body)

        stale = {"Range": "bytes=10-", "If-Range": '"not-the-etag"'}
        response, body = await pages.get(path, headers=stale)
        assert response.status == 200 and body == content
        delivered += len(body)

        response, body = await pages.get(path, headers={"Range": f"bytes={size}-"})
        assert response.status == 416 and body == b""
        assert response.headers["Content-Range"] == f"bytes */{size}"

        response, body = await pages.request("HEAD", path)
        assert response.status == 200 and body == b""
        assert response.headers["Content-Length"] == str(size)

        # the whole file, the range from byte 0 and the stale If-Range; not HEAD, not the rest
        assert await pages.downloads(made, stored) == 3
    await blobs.close()
    assert sum(kernel_sent) == (delivered if kind == "local" else 0)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_visitor_leaving_mid_file_leaves_nothing_open_and_others_are_served(
    database: Database, tmp_path: Path, kernel_sent: list[int]
) -> None:
    content = os.urandom(32 * MIB)  # far more than the sockets' buffers hold
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link([("Exposé.pdf", "application/pdf", content)])
        path = made.file_path(made.files[0])
        blob_file = blobs.location(made.files[0].sha256)
        response, body = await pages.get(path)  # the server's connections and threads set up
        assert body == content
        before = len(open_files())

        url = yarl.URL(pages.url)
        assert url.host is not None and url.port is not None
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {url.host}\r\nUser-Agent: {PERSON_UA}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(MIB) == content[:MIB]
        assert blob_file in open_files()  # the server is in the middle of the file
        response, body = await pages.get(path)  # while that visitor stalls
        assert response.status == 200 and body == content
        writer.transport.abort()

        response, body = await pages.get(path)
        assert response.status == 200 and body == content

        for _ in range(500):
            if blob_file not in open_files() and len(open_files()) <= before:
                break
            await asyncio.sleep(0.01)
        assert blob_file not in open_files()
        assert len(open_files()) <= before
    assert sum(kernel_sent) >= 3 * len(content) + MIB


async def test_a_tls_connection_is_streamed_not_sent_by_the_kernel(
    tmp_path: Path, kernel_sent: list[int]
) -> None:
    """The kernel would send the file past the encryption; the relay's web has no TLS of its
    own (a proxy in front has it), so a small app with TLS serves a blob as the pages do."""
    content = os.urandom(2 * MIB + 3)
    blobs = LocalBlobStore(tmp_path / "blobs")
    digest = await blobs.put(content)
    runner, port = await _tls_app(blobs, digest, tmp_path)
    try:
        client = ssl.create_default_context(cafile=tmp_path / "localhost.crt")
        async with aiohttp.ClientSession() as http:
            for start, length in [(0, len(content)), (MIB - 1, MIB + 4)]:
                url = f"https://localhost:{port}/{start}/{length}"
                async with http.get(url, ssl=client) as response:
                    assert response.status == 200
                    assert await response.read() == content[start : start + length]
    finally:
        await runner.cleanup()
    assert kernel_sent == []


async def _tls_app(blobs: BlobStore, digest: str, directory: Path) -> tuple[web.AppRunner, int]:
    async def serve(request: web.Request) -> web.StreamResponse:
        start, length = int(request.match_info["start"]), int(request.match_info["length"])
        async with blobs.open(digest) as blob:
            response = web.StreamResponse()
            response.content_length = length
            await response.prepare(request)
            await send_blob(request, response, blob, start, length)
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{start}/{length}", serve)
    cert, key = make_certificate(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port
