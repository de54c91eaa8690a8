"""inline blobs: small blobs of the intake kept in the database, beside the rows naming them

Revision ID: 0014_inline_blobs
Revises: 0013_journal_sequencer
Create Date: 2026-12-03 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_inline_blobs"
down_revision: str | None = "0013_journal_sequencer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inline_blobs",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )


def downgrade() -> None:
    count = op.get_bind().scalar(sa.text("SELECT COUNT(*) FROM inline_blobs"))
    if count:
        raise RuntimeError(
            f"{count} blobs live in the database's inline_blobs table, and the schema before"
            " this revision has no place for them: downgrading would lose them"
        )
    op.drop_table("inline_blobs")
