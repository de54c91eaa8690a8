"""body hash: the DKIM body hash of a big signed original, kept by the intake so that its
delivery reads the blob once

Revision ID: 0015_body_hash
Revises: 0014_inline_blobs
Create Date: 2026-12-04 20:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_body_hash"
down_revision: str | None = "0014_inline_blobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        # null: small, unsigned, or stored before this revision (delivery hashes the body)
        batch_op.add_column(sa.Column("body_hash", sa.String(length=44), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("body_hash")
