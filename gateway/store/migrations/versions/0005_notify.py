"""notify: the agent's mail preferences, the first-download notice cursor, expiry warnings

Revision ID: 0005_notify
Revises: 0004
Create Date: 2026-12-02 15:55:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_notify"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        # {} means "the defaults": only what the agent changed is stored
        batch_op.add_column(
            sa.Column("notify", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
    with op.batch_alter_table("letters", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("expiry_warned_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "notice_cursor",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Start at the journal's head: downloads from before the upgrade are not announced late.
    op.execute("INSERT INTO notice_cursor (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM events")


def downgrade() -> None:
    op.drop_table("notice_cursor")
    with op.batch_alter_table("letters", schema=None) as batch_op:
        batch_op.drop_column("expiry_warned_at")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("notify")
