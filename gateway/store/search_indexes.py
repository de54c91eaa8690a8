"""PostgreSQL's trigram indexes for the timeline's text search (`ILIKE '%...%'`).

They exist only where the pg_trgm extension could be created (migration 0006), so the
models do not declare them: `include_object` keeps a comparison of the models with the
database (autogenerate, the migrations test) from asking to drop them.
"""

from __future__ import annotations

from typing import Any

# (index, table, column)
TRIGRAM_INDEXES = (
    ("ix_messages_subject_trgm", "messages", "subject"),
    ("ix_deliveries_recipient_trgm", "deliveries", "recipient"),
)

_NAMES = frozenset(name for name, _, _ in TRIGRAM_INDEXES)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's filter: everything but the optional trigram indexes."""
    return not (type_ == "index" and name in _NAMES)
