"""Whether a database is at the newest migration, read without importing alembic.

alembic (with mako and pygments, which it imports) adds about 10 MiB to a process that
keeps it for its whole life, while `sealrelay serve` needs it only when there is something
to migrate: on every other start the schema is current. So the heads are read from the
migration files' `revision` and `down_revision` values, and the database's revisions from
alembic's own table; `Database.upgrade` imports alembic only when the two differ.
"""

from __future__ import annotations

import ast
from pathlib import Path

from sqlalchemy import Connection, inspect, text

VERSION_TABLE = "alembic_version"  # alembic's default; env.py keeps it


def migration_heads(versions: Path) -> set[str]:
    """The revisions no other migration in `versions` builds on."""
    revisions: set[str] = set()
    bases: set[str] = set()
    for path in versions.glob("*.py"):
        values = _assigned(path, ("revision", "down_revision"))
        revision = values.get("revision")
        if isinstance(revision, str):
            revisions.add(revision)
        down = values.get("down_revision")
        if isinstance(down, str):
            bases.add(down)
        elif isinstance(down, tuple | list):
            bases.update(str(base) for base in down)
    return revisions - bases


def stored_revisions(connection: Connection) -> set[str]:
    """The revisions the database says it is at; none for a database never migrated."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return set()
    rows = connection.execute(text("SELECT version_num FROM alembic_version"))
    return {str(row[0]) for row in rows}


def _assigned(path: Path, names: tuple[str, ...]) -> dict[str, object]:
    """Module-level constants (`name = "..."` or `name: str = "..."`) of a migration file."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in names:
            found[target.id] = ast.literal_eval(value)
    return found
