"""routes: which [[routes]] entry a copy's last attempt took, and which trusted entry let a
message in (what a route's `trusted` condition matches)

Revision ID: 0011_routes
Revises: 0010_trusted_front
Create Date: 2026-12-02 21:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_routes"
down_revision: str | None = "0010_trusted_front"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        # null: not attempted yet (or attempted before routes were recorded)
        batch_op.add_column(sa.Column("route", sa.String(length=100), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trusted_entry", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("trusted_entry")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("route")
