"""sender name: the display name the From gives the sender, kept by the intake so that
prospects' pages need not read the original (which may then go after keep_originals_days)

Revision ID: 0016_sender_name
Revises: 0015_body_hash
Create Date: 2026-12-05 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_sender_name"
down_revision: str | None = "0015_body_hash"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        # null: stored before this revision (the pages read the name from the original)
        batch_op.add_column(sa.Column("sender_name", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("sender_name")
