"""trust-fixes: the signed copy of a released original, the last TOTP step a user spent

Revision ID: 0008_trust_fixes
Revises: 0007_webhook_console
Create Date: 2026-12-02 18:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_trust_fixes"
down_revision: str | None = "0007_webhook_console"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        # a released original: keep the exact DKIM-signed bytes the recipient got
        batch_op.add_column(
            sa.Column("keep_signed", sa.Boolean(), nullable=False, server_default=sa.text("false"))
        )
        batch_op.add_column(sa.Column("signed_blob", sa.String(length=64), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        # the newest TOTP step a sign-in used: an older or equal step is refused in any process
        batch_op.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("totp_last_step")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("signed_blob")
        batch_op.drop_column("keep_signed")
