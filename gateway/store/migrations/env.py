"""Alembic environment: run with a connection handed over by `Database.upgrade`, or, for
`alembic revision --autogenerate` during development, against SEALRELAY_DATABASE__URL."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from gateway.store.db import make_engine
from gateway.store.models import Base
from gateway.store.search_indexes import include_object

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = make_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(run)
    await engine.dispose()


handed_over = config.attributes.get("connection")
if handed_over is not None:
    run(handed_over)
else:
    asyncio.run(
        run_from_url(
            os.environ.get("SEALRELAY_DATABASE__URL", "sqlite+aiosqlite:///var/sealrelay.db")
        )
    )
