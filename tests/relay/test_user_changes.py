"""Changing a user's role, group and whether they may sign in: journaled only when it changes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway import users
from gateway.store.db import Database
from gateway.store.models import Event, Role

PASSWORD = "correct horse battery"


async def _journal(db: Database) -> list[tuple[str, dict[str, object]]]:
    async with db.transaction() as session:
        rows = (await session.scalars(select(Event).order_by(Event.id))).all()
    return [(e.type, e.data) for e in rows if e.type != "user.created"]


async def test_role_group_and_disabling(database: Database) -> None:
    await users.add_user(
        database, "anna@broker.example", PASSWORD, group="north", aliases=("team@broker.example",)
    )
    user, aliases = await users.change_user(database, "Anna@Broker.example", role=Role.TEAM_LEAD)
    assert user.role == Role.TEAM_LEAD and user.group_name == "north"
    assert aliases == ["team@broker.example"]
    user, _ = await users.change_user(database, "anna@broker.example", group=None, disabled=True)
    assert user.group_name is None and user.disabled
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is None
    await users.change_user(database, "anna@broker.example", role=Role.TEAM_LEAD, disabled=True)
    await users.change_user(database, "anna@broker.example", disabled=False)
    agent = await users.authenticate(database, "anna@broker.example", PASSWORD)
    assert agent is not None and agent.role == Role.TEAM_LEAD and agent.group is None
    assert await _journal(database) == [
        ("user.changed", {"email": "anna@broker.example", "role": "team_lead", "group": "north"}),
        ("user.changed", {"email": "anna@broker.example", "role": "team_lead", "group": None}),
        ("user.disabled", {"email": "anna@broker.example"}),
        ("user.enabled", {"email": "anna@broker.example"}),
    ]


async def test_unknown_or_invalid_users_change_nothing(database: Database) -> None:
    for email in ["nobody@broker.example", "not an address"]:
        with pytest.raises(users.UserError):
            await users.change_user(database, email, disabled=True)
    assert await _journal(database) == []
