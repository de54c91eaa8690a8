"""A consistent copy of a SQLite database while the relay writes to it.

Copying the file (and its -wal) with `cp` while the relay runs can catch a transaction half
way; SQLite's online backup reads one snapshot under a read lock, which in WAL mode does not
hold up the relay's writer. The copy is checked (`PRAGMA quick_check`), flushed to disk and
only then given its name, so a file at `destination` is always a whole, readable database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

BUSY_TIMEOUT_SECONDS = 30


class BackupError(Exception):
    """The copy could not be made; nothing is left at the destination."""


def backup(source: Path, destination: Path) -> int:
    """Copy the database at `source` to the new file `destination`; its size in bytes."""
    if destination.exists():
        raise BackupError(f"{destination} exists; name a new file")
    partial = destination.with_name(f".{destination.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # users' data
        with (
            contextlib.closing(
                sqlite3.connect(_existing(source), uri=True, timeout=BUSY_TIMEOUT_SECONDS)
            ) as live,
            contextlib.closing(sqlite3.connect(partial)) as copy,
        ):
            live.backup(copy)
            [(verdict,)] = copy.execute("PRAGMA quick_check").fetchall()
            if verdict != "ok":
                raise BackupError(f"the copy does not check out: {verdict}")
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.link(partial, destination)  # refuses to replace a file made meanwhile
        directory = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"{source} could not be copied to {destination}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return destination.stat().st_size


def _existing(path: Path) -> str:
    """The database as a URI that opens it without creating one where there is none."""
    return f"{path.absolute().as_uri()}?mode=rw"
