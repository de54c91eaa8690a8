"""Content-addressed files: raw originals, attachments, generated documents.

A blob is durable when `put` returns: written to a temp file, fsynced, renamed into place,
and the directory fsynced, so a crash leaves either the whole blob or none of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobMissing(FileNotFoundError):
    """A blob a row names is not in the store (deleted, or lost with a disk)."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} is not in the store")
        self.digest = digest


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"not a blob digest: {digest!r}")
        return self.root / digest[:2] / digest[2:4] / digest

    def put_sync(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        _make_dirs_durably(target.parent, self.root)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return digest

    async def put(self, data: bytes) -> str:
        """The sha256 of `data`, once it is safely on disk."""
        return await asyncio.to_thread(self.put_sync, data)

    def read_sync(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissing(digest) from exc

    async def read(self, digest: str) -> bytes:
        return await asyncio.to_thread(self.read_sync, digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()


def _make_dirs_durably(directory: Path, root: Path) -> None:
    """Create the fan-out directories, fsyncing each parent whose entries changed."""
    missing = []
    current = directory
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_dir(created.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
