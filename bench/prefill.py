"""A relay's database as it is after a while in service: migrated, holding delivered mail, and
on PostgreSQL analyzed.

A new PostgreSQL database has no statistics until autovacuum's first look (once a minute).
Until then the planner guesses the tables' sizes from their pages, and for small tables it
answers a lookup of a few rows by their ids (a claim's copies and their messages) by reading
both tables whole, a cost that grows with every message until the first ANALYZE. A
benchmark that lasts less than a minute on a new database measures that first minute, not
the relay in service; bench/compare.py and bench/pg_commit.py fill the database first.

The messages are committed as the relay commits them (bench/instructions.py's
`commit_steps`: intake, claim, hold, outcome, chaining), 20 to a transaction.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.instructions import BATCH_OF, commit_steps, messages, transactions_on
from gateway.store.db import Database

__all__ = ["prefill"]


async def prefill(url: str, count: int) -> None:
    """Migrate the database at `url` and commit `count` delivered messages into it; then, on
    PostgreSQL, ANALYZE as autovacuum would have."""
    db = Database.connect(url)
    try:
        await db.upgrade()
    finally:
        await db.close()
    if count < 1:
        return
    found = [(raw, hashlib.sha256(raw).hexdigest()) for raw in messages(count, "prefill")]
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as connection:

            def fill(sync: Connection) -> None:
                transaction = transactions_on(sync)
                for first in range(0, len(found), BATCH_OF):
                    commit_steps(found[first : first + BATCH_OF], transaction, lambda _step: None)

            await connection.run_sync(fill)
            if connection.dialect.name == "postgresql":
                await connection.execute(text("ANALYZE"))
                await connection.commit()
    finally:
        await engine.dispose()
