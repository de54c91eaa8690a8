"""The content-addressed store: whole blobs or none, deduplicated by sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.blobstore import BlobStore


async def test_put_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = await store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert await store.put(b"hello") == digest
    assert await store.read(digest) == b"hello"
    assert store.path(digest).parent.parent.parent == tmp_path / "blobs"
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


async def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr("gateway.blobstore.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        await store.put(b"data")
    assert not store.exists(hashlib.sha256(b"data").hexdigest())
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 63, "g" * 64])
def test_only_digests_name_blobs(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path(bad)
