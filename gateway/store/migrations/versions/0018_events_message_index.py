"""events message index: drop ix_events_message_id, which ix_events_message_order covers

ix_events_message_order (message_id, id), added with the sequencer, answers every lookup by
message that the single-column index answered, in the order the timeline reads. Each event
paid for both on insert, and on PostgreSQL again when the sequencer chains it (a new row
version, a new entry in every index).

Revision ID: 0018_events_message_index
Revises: 0017_inline_blobs_lz4
Create Date: 2026-12-06 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018_events_message_index"
down_revision: str | None = "0017_inline_blobs_lz4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_events_message_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_message_id", "events", ["message_id"], unique=False)
