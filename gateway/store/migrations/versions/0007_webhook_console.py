"""webhook-console: indexes on webhook_deliveries for the worker's claim and the console

Revision ID: 0007_webhook_console
Revises: 0006_admin_users
Create Date: 2026-12-02 18:40:00.000000

webhook_deliveries keeps every delivery ever made, so whatever scans one endpoint's rows
grows with its history. EXPLAIN on SQLite and PostgreSQL (500,000 deliveries over ten
endpoints) showed three such scans: the claim's check for an earlier queued event of the same
message (by endpoint and event_seq, all earlier rows), the newest-first listing (a sort of
all the endpoint's rows) and the endpoint page's figures. Each index below turns one into a
short range seek. Only the last changes on a settle (status, updated_at), as the due index
already does.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_webhook_console"
down_revision: str | None = "0006_admin_users"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_webhook_deliveries_message": ["endpoint_id", "message_id", "event_seq"],
    "ix_webhook_deliveries_recent": ["endpoint_id", "created_at", "event_seq"],
    "ix_webhook_deliveries_outcome": ["endpoint_id", "status", "updated_at"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "webhook_deliveries", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="webhook_deliveries")
