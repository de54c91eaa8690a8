"""Content-addressed files: raw originals, attachments, generated documents.

A blob is durable when `put` returns: written to a temp file, fsynced, renamed into place,
and the directory fsynced, so a crash leaves either the whole blob or none of it.

A writer holds an exclusive lock (flock) on its temp file while it writes, and the kernel
drops the lock when the process dies however it dies. So a temp file nobody has locked was
left by a killed writer, and start-up removes it, while the temp files of another instance
still writing into the same store stay.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger(__name__)


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
        fd, tmp_name = self._locked_temp_file()
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

    def _locked_temp_file(self) -> tuple[int, str]:
        """A new temp file, locked; made again if start-up removed it before the lock."""
        while True:
            fd, name = tempfile.mkstemp(dir=self._tmp)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, name
            os.close(fd)

    def remove_abandoned_temp_files(self) -> int:
        """Delete temp files no living writer holds (left by a kill); how many went."""
        removed = 0
        for path in self._tmp.iterdir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its writer finished meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer is at work on it
            else:
                path.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d temp file(s) an interrupted write left in %s", removed, self._tmp)
        return removed

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
