"""The schema check that spares `serve` importing alembic when nothing is to migrate
(gateway/store/schema_version.py), against alembic's own answers, on both databases."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

from gateway.store.db import MIGRATIONS, Database
from gateway.store.schema_version import migration_heads, stored_revisions

ROOT = Path(__file__).resolve().parents[2]
UPGRADE = """
import asyncio, sys
from gateway.store.db import Database

async def main() -> None:
    db = Database.connect(sys.argv[1])
    await db.upgrade()
    imported = "alembic" in sys.modules
    current, newest = await db.schema_revisions()  # alembic's own reading
    await db.close()
    print(imported, current == newest)

asyncio.run(main())
"""


def test_the_heads_are_alembics() -> None:
    assert migration_heads(MIGRATIONS / "versions") == set(
        ScriptDirectory(str(MIGRATIONS)).get_heads()
    )


def test_a_merge_and_a_branch_are_read_as_alembic_would(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (tmp_path / "b.py").write_text('revision: str = "b"\ndown_revision: str | None = "a"\n')
    (tmp_path / "c.py").write_text('revision = "c"\ndown_revision = "a"\n')
    assert migration_heads(tmp_path) == {"b", "c"}
    (tmp_path / "d.py").write_text('revision = "d"\ndown_revision = ("b", "c")\n')
    assert migration_heads(tmp_path) == {"d"}


async def test_a_migrated_database_is_at_the_heads(database: Database) -> None:
    async with database.engine.connect() as connection:
        stored = await connection.run_sync(stored_revisions)
    assert stored == migration_heads(MIGRATIONS / "versions")


async def upgrade_in_a_process(url: str) -> tuple[bool, bool]:
    """(whether the upgrade imported alembic, whether alembic then finds the schema current)"""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        UPGRADE,
        url,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    imported, current = out.decode().split()
    return imported == "True", current == "True"


async def test_alembic_is_imported_only_to_migrate(database_url: str) -> None:
    """A new database is migrated (with alembic); a current one is left as it is, and the
    process never imports alembic."""
    assert await upgrade_in_a_process(database_url) == (True, True)
    assert await upgrade_in_a_process(database_url) == (False, True)
