"""trusted-front: which trusted client sent a message, for its Received line

Revision ID: 0010_trusted_front
Revises: 0009_timeline_speed
Create Date: 2026-12-02 19:15:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_trusted_front"
down_revision: str | None = "0009_timeline_speed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        # null: an agent logged in (or the message is the relay's own)
        batch_op.add_column(sa.Column("trusted_client", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("trusted_client")
