"""timeline speed: indexes for the timeline's state filter and, on PostgreSQL, its text search

Revision ID: 0009_timeline_speed
Revises: 0008_trust_fixes
Create Date: 2026-12-02 18:45:00.000000
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy.exc import DBAPIError

revision: str = "0009_timeline_speed"
down_revision: str | None = "0008_trust_fixes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("sealrelay.migrations")

# as gateway/store/search_indexes.py names them (index, table, column); copied, so that
# this migration stays what it was whatever that module becomes
TRIGRAM_INDEXES = (
    ("ix_messages_subject_trgm", "messages", "subject"),
    ("ix_deliveries_recipient_trgm", "deliveries", "recipient"),
)


def upgrade() -> None:
    # the state filter's candidates: the messages with a copy (a letter) in one status
    op.create_index("ix_deliveries_status_message", "deliveries", ["status", "message_id"])
    op.create_index("ix_letters_status_message", "letters", ["status", "message_id"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # Creating an extension takes a privilege the relay's role may lack; without
    # the indexes the text search still works, by reading every row. In a savepoint, so
    # that a refusal leaves the rest of the upgrade standing.
    # The operator class is named with the extension's schema: an extension made earlier in
    # another schema (`IF NOT EXISTS` then leaves it there) is outside this search path.
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public")
            home = bind.exec_driver_sql(
                "SELECT n.nspname FROM pg_extension e"
                " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm'"
            ).scalar_one()
            for name, table, column in TRIGRAM_INDEXES:
                op.create_index(
                    name,
                    table,
                    [column],
                    postgresql_using="gin",
                    postgresql_ops={column: f'"{home}".gin_trgm_ops'},
                )
    except DBAPIError as refused:
        log.warning(
            "no trigram indexes for the timeline's text search (%s): the search works, "
            "but reads every message; README (PostgreSQL and text search) says how an "
            "administrator adds them",
            str(refused.orig).strip(),
        )


def downgrade() -> None:
    for name, _, _ in TRIGRAM_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.drop_index("ix_letters_status_message", table_name="letters")
    op.drop_index("ix_deliveries_status_message", table_name="deliveries")
