"""The local directory store beyond the contract (tests/store/test_blob_contract.py): its layout,
its durability, and what a killed writer leaves behind."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gateway.store import local_blobs
from gateway.store.blobs import HashedFile
from gateway.store.local_blobs import LocalBlobStore
from tests.support import LETTER_TOML, free_port


async def test_put_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = await store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert await store.put(b"hello") == digest
    assert await store.read(digest) == b"hello"
    assert Path(store.location(digest)).parent.parent.parent == tmp_path / "blobs"
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalBlobStore(tmp_path / "blobs")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr("gateway.store.local_blobs.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        await store.put(b"data")
    assert not await store.exists(hashlib.sha256(b"data").hexdigest())
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


# A writer that stops inside put, after its temp file exists: fsync never returns.
_STUCK_WRITER = """
import os, stat, sys, time
from pathlib import Path
from gateway.store.blobs import HashedFile
from gateway.store.local_blobs import LocalBlobStore

fsync = os.fsync

def stuck(fd):
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return fsync(fd)
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stuck
LocalBlobStore(Path(sys.argv[1])).put_sync(sys.argv[2].encode() * 1000)
"""


async def _stuck_writer(root: Path, content: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STUCK_WRITER, str(root), content, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        assert await process.stdout.readline() == b"writing\n"
    return process


async def test_temp_files_of_a_killed_writer_go_at_start_up(tmp_path: Path) -> None:
    """A SIGKILL mid-put leaves a temp file; the next start removes it, but never the temp
    file of a writer still at work (another instance sharing the store)."""
    root = tmp_path / "blobs"
    killed = await _stuck_writer(root, "killed")
    killed.kill()
    await killed.wait()
    working = await _stuck_writer(root, "working")
    try:
        left = {path.name for path in (root / "tmp").iterdir()}
        assert len(left) == 2
        smtp_port, web_port = free_port(), free_port()
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nallow_plaintext_auth_on_loopback = true\n'
            f'[web]\nlisten = "127.0.0.1:{web_port}"\n'
            f'[upstream]\nurl = "capture:{tmp_path / "outbox"}"\n'
            f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path / "relay.db"}"\n'
            f'[storage]\npath = "{root}"\n' + LETTER_TOML
        )
        serve = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "sealrelay"),
            "serve",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert serve.stderr is not None
            async with asyncio.timeout(60):
                while b"sealrelay running" not in (line := await serve.stderr.readline()):
                    assert line, "serve exited before it was running"
            remaining = {path.name for path in (root / "tmp").iterdir()}
        finally:
            serve.send_signal(signal.SIGTERM)
            await serve.communicate()
        assert len(remaining) == 1 and remaining < left
    finally:
        working.kill()
        await working.wait()


def nameless(directory: Path, data: bytes) -> int:
    """A file as the SMTP front spools one: O_TMPFILE, no O_EXCL, so it may be named."""
    fd = os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o600)
    os.write(fd, data)
    return fd


async def test_a_spooled_file_is_linked_into_place_not_copied(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"a big message, as spooled\r\n" * 40_000
    fd = nameless(tmp_path, data)
    try:
        digest = await store.put_file(HashedFile(fd, hashlib.sha256(data).hexdigest(), len(data)))
        stored = Path(store.location(digest))
        assert stored.stat().st_ino == os.fstat(fd).st_ino  # the same file, now named
    finally:
        os.close(fd)
    assert stored.read_bytes() == data
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


@pytest.mark.parametrize("where", ["another file system", "a file that may not be named"])
async def test_a_file_that_cannot_be_linked_is_copied(tmp_path: Path, where: str) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"spooled elsewhere\r\n" * 40_000
    if where == "another file system":
        shm = Path("/dev/shm")
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "the test needs /dev/shm apart"
        fd = nameless(shm, data)
    else:
        with tempfile.TemporaryFile(dir=tmp_path) as unnamable:  # O_EXCL: never named
            fd = os.dup(unnamable.fileno())
        os.write(fd, data)
    try:
        digest = await store.put_file(HashedFile(fd, hashlib.sha256(data).hexdigest(), len(data)))
        stored = Path(store.location(digest))
        assert stored.stat().st_ino != os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert stored.read_bytes() == data
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_a_file_of_bytes_stored_already_only_makes_the_blob_young(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"sent twice\r\n" * 40_000
    digest = await store.put(data)
    stored = Path(store.location(digest))
    os.utime(stored, (0, 0))
    fd = nameless(tmp_path, data)
    try:
        assert await store.put_file(HashedFile(fd, digest, len(data))) == digest
        assert stored.stat().st_ino != os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert stored.stat().st_mtime > 0 and stored.read_bytes() == data


async def test_a_file_of_another_size_than_said_is_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"short\r\n"
    fd = nameless(tmp_path, data)
    try:
        with pytest.raises(ValueError, match="holds 7 bytes"):
            await store.put_file(HashedFile(fd, hashlib.sha256(data).hexdigest(), 8))
    finally:
        os.close(fd)
    assert [info async for info in store.list()] == []


async def test_files_of_the_same_bytes_put_at_once_make_one_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"the same offer, from eight sessions at once\r\n" * 20_000
    digest = hashlib.sha256(data).hexdigest()
    fds = [nameless(tmp_path, data) for _ in range(8)]
    try:
        put = [store.put_file(HashedFile(fd, digest, len(data))) for fd in fds]
        assert await asyncio.gather(*put) == [digest] * 8
        inodes = {os.fstat(fd).st_ino for fd in fds}
        assert Path(store.location(digest)).stat().st_ino in inodes  # one of them, linked
    finally:
        for fd in fds:
            os.close(fd)
    assert [info.digest async for info in store.list()] == [digest]
    assert Path(store.location(digest)).read_bytes() == data


async def test_a_read_the_page_cache_holds_needs_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(3 * 256 * 1024 + 77)
    digest = await store.put(data)
    hops: list[object] = []
    to_thread = asyncio.to_thread

    async def counted(function: Any, *args: Any) -> Any:
        hops.append(function)
        return await to_thread(function, *args)

    async with store.open(digest) as blob:
        monkeypatch.setattr(asyncio, "to_thread", counted)
        assert await blob.read(0, len(data)) == data  # just written: in the cache
        assert await blob.read(len(data) - 100, 500) == data[-100:]
        assert hops == []
        with open(store.location(digest), "rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert await blob.read(256 * 1024, 256 * 1024) == data[256 * 1024 : 512 * 1024]
        assert len(hops) == 1  # from the disk: in a thread, not on the event loop


async def test_a_file_system_without_nowait_reads_are_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(300_000)
    digest = await store.put(data)
    monkeypatch.setattr(local_blobs, "_NOWAIT", local_blobs._NOWAIT)  # restored afterwards

    def refused(*args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "preadv", refused)
    async with store.open(digest) as blob:
        assert await blob.read(0, len(data)) == data
        assert local_blobs._NOWAIT is None  # not asked again
        assert await blob.read(10, 20) == data[10:30]
