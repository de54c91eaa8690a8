"""Downloads from any blob store: the kernel sends the local store's files (sendfile), and a
store without local files (S3, against tests/s3_server.py; the contract's in-memory store) is
streamed with the same bytes, ranges and zips."""

from __future__ import annotations

import asyncio
import io
import os
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from tests.links.test_downloads import Clock, running_pages
from tests.store.test_blob_contract import STORES


@pytest.fixture
async def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts the event loop was asked to sendfile (it still sends them)."""
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    real: Callable[..., Any] = loop.sendfile

    async def counted(
        transport: Any, file: Any, offset: int = 0, count: int | None = None, **kw: Any
    ) -> int:
        calls.append(count or 0)
        return int(await real(transport, file, offset, count, **kw))

    monkeypatch.setattr(loop, "sendfile", counted)
    return calls


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", sorted(STORES))
async def test_files_ranges_and_zips_from_every_store(
    database: Database,
    tmp_path: Path,
    kind: str,
    sendfile_calls: list[int],
    request: pytest.FixtureRequest,
) -> None:
    content, small = os.urandom(3 * 1024 * 1024 + 17), b"%PDF a small second file"
    blobs = STORES[kind](request, tmp_path)
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link(
            [("Exposé.pdf", "application/pdf", content), ("Plan.pdf", "application/pdf", small)]
        )
        path = made.file_path(made.files[0])
        response, body = await pages.get(path)
        assert response.status == 200 and body == content
        response, body = await pages.get(path, headers={"Range": "bytes=1048570-"})
        assert response.status == 206 and body == content[1048570:]
        response, body = await pages.request("HEAD", path)
        assert response.headers["Content-Length"] == str(len(content)) and body == b""
        response, body = await pages.get(made.path("/zip"))
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(body))
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert [archive.read(name) for name in archive.namelist()] == [content, small]
    await blobs.close()
    if kind == "local":
        assert sendfile_calls == [len(content), len(content) - 1048570]
    else:
        assert sendfile_calls == []


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", sorted(STORES))
async def test_a_file_lost_from_any_store_is_a_404_not_a_500(
    database: Database, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    blobs = STORES[kind](request, tmp_path)
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link([("Exposé.pdf", "application/pdf", b"%PDF lost soon")])
        await blobs.delete(made.files[0].sha256)
        for path in (made.file_path(made.files[0]), made.path("/zip")):
            response, _ = await pages.get(path)
            assert response.status == 404, path
    await blobs.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_parallel_zips_never_wait_for_the_threads_they_hold(
    database: Database, tmp_path: Path
) -> None:
    """A zip is pulled in a thread that waits for the store on the event loop, and the local
    store reads in the loop's worker threads: were the zips pulled in those same workers, as
    many zips as workers would wait for each other for ever."""
    workers = 1
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers))
    files = [(f"{n}.pdf", "application/pdf", os.urandom(2 * 1024 * 1024)) for n in range(3)]
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link(files)
        async with asyncio.timeout(30):
            answers = await asyncio.gather(
                *(pages.get(made.path("/zip")) for _ in range(2 * workers))
            )
    for response, body in answers:
        assert response.status == 200
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert [archive.read(n) for n in archive.namelist()] == [f[2] for f in files]
