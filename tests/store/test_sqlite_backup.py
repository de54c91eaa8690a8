"""`sealrelay db backup`: a whole, checked copy of the SQLite database, also while it is
written to, that a relay configured on it reads as its own; never a half-written file."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.store import sqlite_backup
from tests.cli_runner import sealrelay, write_config

AGENT = "anna@broker.example"
PAIRS = 2000


def _writer(path: Path, started: threading.Event, stop: threading.Event) -> int:
    """Rows go in two at a time, one transaction each: a copy with an odd count caught one
    half way."""
    written = 0
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        while written < PAIRS and not stop.is_set():
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO pairs (payload) VALUES (?)", [(b"x" * 512,)] * 2)
            db.execute("COMMIT")
            written += 1
            started.set()
    return written


def test_a_copy_taken_while_rows_go_in_holds_whole_transactions(tmp_path: Path) -> None:
    live = tmp_path / "live.db"
    with contextlib.closing(sqlite3.connect(live)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE pairs (id INTEGER PRIMARY KEY, payload BLOB)")
    started, stop = threading.Event(), threading.Event()
    writer = threading.Thread(target=_writer, args=(live, started, stop))
    writer.start()
    try:
        assert started.wait(30)
        copy = tmp_path / "copy.db"
        sqlite_backup.backup(live, copy)
    finally:
        stop.set()
        writer.join(60)
    with contextlib.closing(sqlite3.connect(copy)) as db:
        [(count,)] = db.execute("SELECT count(*) FROM pairs").fetchall()
        [(mode,)] = db.execute("PRAGMA journal_mode").fetchall()
    assert count >= 2 and count % 2 == 0
    assert mode == "delete", "one file, no -wal beside it to copy along"
    assert copy.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]


def test_nothing_is_left_where_the_copy_failed(tmp_path: Path) -> None:
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is no database " * 100)
    with pytest.raises(sqlite_backup.BackupError, match="could not be copied"):
        sqlite_backup.backup(broken, tmp_path / "copy.db")
    with pytest.raises(sqlite_backup.BackupError, match="could not be copied"):
        sqlite_backup.backup(tmp_path / "none.db", tmp_path / "copy.db")
    assert not (tmp_path / "none.db").exists(), "no empty database made where there was none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.db"]


async def test_the_command_copies_what_a_relay_on_the_copy_reads(tmp_path: Path) -> None:
    config = write_config(tmp_path / "live")
    added = await sealrelay("user", "add", AGENT, "--config", str(config))
    assert added.code == 0, added.err
    copy = tmp_path / "backup" / "relay.db"
    copy.parent.mkdir()
    made = await sealrelay("db", "backup", str(copy), "--config", str(config))
    assert made.code == 0, made.err
    assert made.out.startswith(f"{copy}: ") and "now copy the blob store" in made.out

    again = await sealrelay("db", "backup", str(copy), "--config", str(config))
    assert again.code == 1 and again.error_line == f"Error: {copy} exists; name a new file"

    # restored: the copy where the live database was, read by the relay's own commands
    restored = write_config(tmp_path / "restored")
    shutil.copy(copy, tmp_path / "restored" / "relay.db")
    listed = await sealrelay("user", "list", "--config", str(restored))
    assert listed.code == 0 and AGENT in listed.out
    verified = await sealrelay("verify", "--journal", "--config", str(restored))
    assert verified.code == 0, verified.out + verified.err


async def test_the_command_points_postgresql_to_pg_dump_and_names_a_missing_database(
    tmp_path: Path,
) -> None:
    url = "postgresql+asyncpg://relay:secret@db.example/relay"
    refused = await sealrelay(
        "db",
        "backup",
        str(tmp_path / "x.db"),
        "--config",
        str(write_config(tmp_path / "pg")),
        env={"SEALRELAY_DATABASE__URL": url},
    )
    assert refused.code == 1 and "pg_dump --format=custom" in refused.error_line
    assert "secret" not in refused.err
    nothing = await sealrelay(
        "db", "backup", str(tmp_path / "x.db"), "--config", str(write_config(tmp_path / "new"))
    )
    assert nothing.code == 1 and "there is no database at" in nothing.error_line
    assert not (tmp_path / "x.db").exists()
