"""inline blobs lz4: PostgreSQL compresses the inline blobs' bytes with lz4 instead of pglz

pglz tried every 5 KB blob and mostly gave up (mail is largely base64 of compressed files),
at about 0.07 ms of the server's CPU per blob more than lz4, which also compressed the same
blobs a little better (bench/README.md). It applies to blobs written from now on; a server
built without lz4 (or before PostgreSQL 14) keeps pglz. SQLite has no such setting.

Revision ID: 0017_inline_blobs_lz4
Revises: 0016_sender_name
Create Date: 2026-12-06 06:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_inline_blobs_lz4"
down_revision: str | None = "0016_sender_name"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if _server_has("lz4"):
        op.execute("ALTER TABLE inline_blobs ALTER COLUMN data SET COMPRESSION lz4")


def downgrade() -> None:
    if _server_has("lz4"):
        op.execute("ALTER TABLE inline_blobs ALTER COLUMN data SET COMPRESSION DEFAULT")


def _server_has(method: str) -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    methods = bind.scalar(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    )
    return method in (methods or [])
