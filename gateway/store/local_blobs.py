"""The blob store as a local directory: `root/ab/cd/abcd…`, one file per blob.

A blob is durable when a put returns: written to a temp file, fsynced, renamed into place,
and the directory fsynced, so a crash leaves either the whole blob or none of it.

A writer holds an exclusive lock (flock) on its temp file while it writes, and the kernel
drops the lock when the process dies however it dies. So a temp file nobody has locked was
left by a killed writer, and start-up removes it, while the temp files of another instance
still writing into the same store stay.

A big message the SMTP front spooled is not copied in: its nameless spool file (opened
with O_TMPFILE, so it can be given a name) is fsynced and linked into place, when the
spool is on the store's file system; elsewhere its bytes are copied in the kernel.

A disk error (EIO, a full disk, a permission taken away) raises StoreUnavailable, and so
does a blob missing from a store whose `tmp` directory is gone too: the store's directory
was unmounted or removed, which says nothing about the blob (as S3's NoSuchBucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from gateway.store.blobs import (
    BlobInfo,
    BlobMissing,
    BlobReader,
    BlobStore,
    HashedFile,
    StoreUnavailable,
    checked_digest,
    is_digest,
)

log = logging.getLogger(__name__)


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        checked_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    # -- writing

    def put_sync(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with self._trouble("write", None):
            if self._refresh(digest):
                return digest
            with self._temp_file() as (tmp, name):
                tmp.write(data)
                self._settle(tmp, name, digest)
        return digest

    async def put(self, data: bytes) -> str:
        return await asyncio.to_thread(self.put_sync, data)

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> str:
        hasher = hashlib.sha256()
        with self._trouble("write", None):
            temp = await asyncio.to_thread(self._temp_file)
        with temp as (tmp, name):
            async for chunk in chunks:
                hasher.update(chunk)
                with self._trouble("write", None):
                    await asyncio.to_thread(tmp.write, chunk)
            with self._trouble("write", None):
                await asyncio.to_thread(self._settle, tmp, name, hasher.hexdigest())
        return hasher.hexdigest()

    async def put_file(self, file: HashedFile) -> str:
        with self._trouble("write", None):
            return await asyncio.to_thread(self._put_file, file)

    def _put_file(self, file: HashedFile) -> str:
        digest = checked_digest(file.digest)
        size = os.fstat(file.fd).st_size
        if size != file.size:
            raise ValueError(f"the file to store holds {size} bytes, not {file.size}")
        if self._refresh(digest):
            return digest
        os.utime(file.fd)  # young, as a put makes a blob
        os.fsync(file.fd)
        target = self._path(digest)
        _make_dirs_durably(target.parent, self.root)
        try:
            self._link(file.fd, target, digest)
        except OSError as exc:
            if exc.errno not in _CANNOT_LINK:
                raise
            with self._temp_file() as (tmp, name):
                _copy_in_kernel(file, tmp)
                self._settle(tmp, name, digest)
        return digest

    def _link(self, fd: int, target: Path, digest: str) -> None:
        """Name the open file `target` durably, unless a put of the same bytes came first."""
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while True:
                try:  # a directory's fd makes this linkat(), which follows /proc's magic link
                    os.link(f"/proc/self/fd/{fd}", target.name, dst_dir_fd=directory)
                except FileExistsError:
                    if self._refresh(digest):
                        return
                    continue  # and a sweep took it away again: link ours
                os.fsync(directory)
                return
        finally:
            os.close(directory)

    def _refresh(self, digest: str) -> bool:
        """Whether the blob is stored; if so it is young again, as a fresh put would be."""
        try:
            os.utime(self._path(digest))
        except FileNotFoundError:
            return False
        return True

    def _settle(self, tmp: IO[bytes], name: str, digest: str) -> None:
        """Move a written temp file into place durably, or drop it if the blob is there."""
        tmp.flush()
        if self._refresh(digest):
            os.unlink(name)
            return
        os.fsync(tmp.fileno())
        target = self._path(digest)
        _make_dirs_durably(target.parent, self.root)
        os.replace(name, target)
        _fsync_dir(target.parent)

    def _temp_file(self) -> _TempFile:
        return _TempFile(*self._locked_temp_file())

    def _locked_temp_file(self) -> tuple[int, str]:
        """A new temp file, locked; made again if start-up removed it before the lock."""
        while True:
            fd, name = tempfile.mkstemp(dir=self._tmp)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, name
            os.close(fd)

    async def check(self) -> None:
        """The store's `tmp` directory is there (its disk mounted) and writable."""
        if not await asyncio.to_thread(os.access, self._tmp, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"{self._tmp} is not there or not writable")

    async def remove_interrupted_writes(self) -> int:
        return await asyncio.to_thread(self.remove_abandoned_temp_files)

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

    # -- reading

    @asynccontextmanager
    async def open(self, digest: str) -> AsyncIterator[BlobReader]:
        path = self._path(digest)
        with self._trouble("read", digest):
            file = await asyncio.to_thread(path.open, "rb")
        try:
            yield LocalBlobReader(file, self, digest)
        finally:
            file.close()

    async def size(self, digest: str) -> int:
        path = self._path(digest)
        with self._trouble("read", digest):
            return (await asyncio.to_thread(path.stat)).st_size

    async def exists(self, digest: str) -> bool:
        try:
            await self.size(digest)
        except BlobMissing:
            return False
        return True

    async def delete(self, digest: str) -> None:
        path = self._path(digest)
        with self._trouble("delete", None):
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def delete_stale(self, digest: str, written_before: datetime) -> int | None:
        with self._trouble("delete", None):
            return await asyncio.to_thread(self._delete_stale, self._path(digest), written_before)

    def _delete_stale(self, path: Path, written_before: datetime) -> int | None:
        """Move the blob aside first, then judge its age: a put refreshes the file in place
        (utime), so one that came before the move shows in the moved file's mtime and the
        file goes back, and one after it finds no file and writes a new one, which this never
        touches. The moved file stays locked, so a start-up clearing temp files spares it,
        and a second sweeper at the same blob leaves it to the first."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # another sweeper took it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            aside = self._tmp / f"sweep-{path.name}-{os.getpid()}-{fd}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return None
            stat = os.fstat(fd)
            moved = os.stat(aside).st_ino == stat.st_ino  # not a file put since the open
            young = datetime.fromtimestamp(stat.st_mtime, UTC) >= written_before
            if young or not moved:
                with contextlib.suppress(FileExistsError):  # a put wrote it anew meanwhile
                    os.link(aside, path)
                os.unlink(aside)
                return None
            os.unlink(aside)
            return stat.st_size
        finally:
            os.close(fd)

    async def list(self) -> AsyncIterator[BlobInfo]:
        with self._trouble("list", None):
            fans = await asyncio.to_thread(_fan_directories, self.root)
        for fan in fans:
            with self._trouble("list", None):
                infos = await asyncio.to_thread(_blobs_under, fan)
            for info in infos:
                yield info

    @contextmanager
    def _trouble(self, action: str, digest: str | None) -> Iterator[None]:
        """The file system's errors as BlobMissing (no such file, in a store still mounted)
        or StoreUnavailable (anything else: the disk, not the blob, is in trouble)."""
        try:
            yield
        except (BlobMissing, StoreUnavailable):
            raise
        except FileNotFoundError as exc:
            if digest is not None and self._tmp.is_dir():
                raise BlobMissing(digest) from exc
            raise StoreUnavailable(f"cannot {action} in {self.root}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot {action} in {self.root}: {exc}") from exc

    def location(self, digest: str) -> str:
        return str(self._path(digest))


class LocalBlobReader(BlobReader):
    window = 256 * 1024  # a pread from the page cache: small windows cost nothing more

    def __init__(self, file: IO[bytes], store: LocalBlobStore, digest: str) -> None:
        self._file = file
        self._size = os.fstat(file.fileno()).st_size
        self._store = store
        self._digest = digest

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, length: int) -> bytes:
        """Read on the event loop when the page cache holds the whole range (a read that
        cannot wait for the disk), else in a thread: a 10 MB copy leaves in 80 reads of
        256 KiB, nearly always from the cache, and a thread's hop for each cost the relay
        about 9 ms of CPU per such message (bench/README)."""
        with self._store._trouble("read", self._digest):
            fd = self._file.fileno()
            cached = _read_cached(fd, start, max(0, min(length, self._size - start)))
            if cached is not None:
                return cached
            return await asyncio.to_thread(_pread, fd, start, length)

    def kernel_file(self) -> IO[bytes]:
        return self._file

    def uncache(self) -> None:
        """POSIX_FADV_DONTNEED: the blob is durable, so its pages are clean and dropped at
        once (about 1 ms per 10 MB; 10 MB rounds: 90 -> 59 ms of relay CPU per message,
        bench/README)."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # only the cache is at stake
            log.debug("blob %s stays in the page cache: %s", self._digest, exc)


class _TempFile:
    """A locked temp file open for writing; removed unless it was moved into place."""

    def __init__(self, fd: int, name: str) -> None:
        self.file = os.fdopen(fd, "wb")
        self.name = name

    def __enter__(self) -> tuple[IO[bytes], str]:
        return self.file, self.name

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()
        if exc_info[0] is not None:
            Path(self.name).unlink(missing_ok=True)


# another file system (EXDEV), a file that may not be named (ENOENT: a temp file made with
# O_EXCL or deleted; no /proc), a file system or policy that refuses hard links
_CANNOT_LINK = frozenset(
    {errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EACCES, errno.EMLINK, errno.EOPNOTSUPP}
)


def _copy_in_kernel(file: HashedFile, tmp: IO[bytes]) -> None:
    """The file's `size` bytes into `tmp`, without passing through this process."""
    tmp.flush()
    position = 0
    while position < file.size:
        sent = os.sendfile(tmp.fileno(), file.fd, position, file.size - position)
        if sent == 0:
            raise OSError(errno.EIO, f"the file to store ended at byte {position}")
        position += sent


_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14 and later


def _read_cached(fd: int, start: int, length: int) -> bytes | None:
    """`length` bytes from `start` if the page cache holds them all, else None. A file
    system that does not take RWF_NOWAIT is not asked again."""
    global _NOWAIT
    if _NOWAIT is None:
        return None
    buffer = bytearray(length)
    try:
        got = os.preadv(fd, [buffer], start, _NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _NOWAIT = None
        return None
    return bytes(buffer) if got == length else None


def _pread(fd: int, start: int, length: int) -> bytes:
    parts, position, end = [], start, start + length
    while position < end:
        part = os.pread(fd, end - position, position)
        if not part:
            break
        parts.append(part)
        position += len(part)
    return b"".join(parts)


def _fan_directories(root: Path) -> list[Path]:
    return [path for path in root.iterdir() if path.is_dir() and len(path.name) == 2]


def _blobs_under(fan: Path) -> list[BlobInfo]:
    """The blobs in one top-level directory; a blob deleted meanwhile is left out."""
    found = []
    for directory, _, names in os.walk(fan):
        for name in names:
            if not is_digest(name):
                continue
            try:
                stat = os.stat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            found.append(BlobInfo(name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
    return found


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
