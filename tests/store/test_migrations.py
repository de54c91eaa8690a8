"""Migrations against real databases: the newest schema is what the models declare, and
data written under an older schema survives the upgrade with its meaning."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from gateway.store.db import MIGRATIONS, Database
from gateway.store.models import Base
from gateway.store.search_indexes import include_object


def _upgrade_to(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _differences(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"include_object": include_object})
    return list(compare_metadata(context, Base.metadata))


async def test_the_newest_schema_is_what_the_models_declare(database_url: str) -> None:
    db = Database.connect(database_url)
    try:
        await db.upgrade()
        async with db.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await db.close()


async def test_admins_keep_their_role_across_the_roles_migration(database_url: str) -> None:
    db = Database.connect(database_url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "0003")
            await connection.execute(
                text(
                    "INSERT INTO users (email, password_hash, is_admin, disabled, created_at)"
                    " VALUES ('it@broker.example', 'x', true, false, CURRENT_TIMESTAMP),"
                    " ('anna@broker.example', 'x', false, false, CURRENT_TIMESTAMP)"
                )
            )
        await db.upgrade()
        async with db.engine.connect() as connection:
            roles = dict((await connection.execute(text("SELECT email, role FROM users"))).all())
            cursor = (await connection.execute(text("SELECT id, seq FROM webhook_cursor"))).all()
        assert roles == {"it@broker.example": "admin", "anna@broker.example": "agent"}
        assert cursor == [(1, 0)]
    finally:
        await db.close()
