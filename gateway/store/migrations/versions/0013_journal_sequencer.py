"""journal sequencer: events get a row id of their own; seq and the hashes are set later

Writers insert events unnumbered and unchained; the sequencer (gateway/store/sequencer.py)
numbers and chains them in id order. Existing events keep their seq and hashes and get
id = seq.

Revision ID: 0013_journal_sequencer
Revises: 0012_agent_logins
Create Date: 2026-12-03 10:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_journal_sequencer"
down_revision: str | None = "0012_agent_logins"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UNCHAINED = sa.text("seq IS NULL")


def _events_before() -> sa.Table:
    """The table as 0001 and 0004 made it, plus the new id column: what SQLite's batch copies
    from, with the constraint names PostgreSQL gave them, so that they can be dropped."""
    return sa.Table(
        "events",
        sa.MetaData(),
        sa.Column("seq", ROW_ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(length=60), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("delivery_id", sa.String(length=32), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("id", ROW_ID, nullable=True),
        sa.PrimaryKeyConstraint("seq", name="events_pkey"),
        sa.UniqueConstraint("hash", name="events_hash_key"),
        sa.Index("ix_events_message_id", "message_id"),
        sa.Index("ix_events_type", "type"),
        sa.Index("ix_events_message_seq", "message_id", "seq"),
    )


def upgrade() -> None:
    op.add_column("events", sa.Column("id", ROW_ID, nullable=True))
    op.execute("UPDATE events SET id = seq")
    with op.batch_alter_table("events", copy_from=_events_before()) as batch:
        batch.drop_index("ix_events_message_seq")
        batch.drop_constraint("events_pkey", type_="primary")
        batch.alter_column("id", existing_type=ROW_ID, nullable=False)
        batch.create_primary_key("events_pkey", ["id"])
        batch.alter_column("seq", existing_type=ROW_ID, nullable=True)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=True)
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=True)
        batch.create_unique_constraint("uq_events_seq", ["seq"])
        batch.create_index("ix_events_message_order", ["message_id", "id"])
        batch.create_index(
            "ix_events_unchained", ["id"], postgresql_where=UNCHAINED, sqlite_where=UNCHAINED
        )
    if op.get_bind().dialect.name == "postgresql":
        # 0001 made seq a BIGSERIAL, whose default would number rows as they are written:
        # only the sequencer numbers them now
        op.execute("ALTER TABLE events ALTER COLUMN seq DROP DEFAULT")
        op.execute("DROP SEQUENCE IF EXISTS events_seq_seq")
        # what a BIGSERIAL column has: SQLite's INTEGER PRIMARY KEY numbers rows by itself
        op.execute("CREATE SEQUENCE events_id_seq OWNED BY events.id")
        op.execute(
            "SELECT setval('events_id_seq', COALESCE((SELECT MAX(id) FROM events), 0) + 1, false)"
        )
        op.execute("ALTER TABLE events ALTER COLUMN id SET DEFAULT nextval('events_id_seq')")


def downgrade() -> None:
    unchained = op.get_bind().scalar(sa.text("SELECT COUNT(*) FROM events WHERE seq IS NULL"))
    if unchained:
        raise RuntimeError(
            f"{unchained} journal events are not chained yet: start the relay once (its"
            " sequencer chains them) before downgrading"
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE events ALTER COLUMN id DROP DEFAULT")
        op.execute("DROP SEQUENCE events_id_seq")
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_unchained")
        batch.drop_index("ix_events_message_order")
        batch.drop_constraint("uq_events_seq", type_="unique")
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("seq", existing_type=ROW_ID, nullable=False)
        batch.drop_constraint("events_pkey", type_="primary")
        batch.create_primary_key("events_pkey", ["seq"])
        batch.drop_column("id")
        batch.create_index("ix_events_message_seq", ["message_id", "seq"])
