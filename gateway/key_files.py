"""Secret key files beside the database, never in it: the CSRF and token key, the loop mark's
key, the key that seals agents' upstream logins.

Every such file is made the same way, so that two processes starting at once end up with
the same key and none reads a half-written one: written to a temporary file (mode 0600),
flushed to disk, then hard-linked into place; whoever links first wins.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def place_key(path: Path, content: bytes) -> bytes:
    """`content` at `path` unless a key got there first; the bytes the file then holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: use its key
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    return path.read_bytes()
