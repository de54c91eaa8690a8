"""Deleting users, resetting passwords, aliases and the last admin, on both databases.

A deleted user's messages and journal stay; everything that let them act ends."""

from __future__ import annotations

import aiosmtplib
import pytest
from sqlalchemy import func, select

from gateway import users
from gateway.console import totp
from gateway.store.db import Database
from gateway.store.models import Alias, ConsoleSession, Event, Message, Role, User, utcnow
from tests.conftest import AGENT, Harness, make_message

PASSWORD = "a long enough password"
ADMIN = "it@broker.example"
OTHER_ADMIN = "boss@broker.example"


async def _session_for(db: Database, email: str, sid: str) -> None:
    async with db.transaction() as session:
        user = await session.scalar(select(User).where(User.email == email))
        assert user is not None
        now = utcnow()
        session.add(ConsoleSession(id=sid, user_id=user.id, created_at=now, last_seen_at=now))


async def _sessions(db: Database, email: str) -> list[str]:
    async with db.transaction() as session:
        return list(
            (
                await session.scalars(
                    select(ConsoleSession.id)
                    .join(User, User.id == ConsoleSession.user_id)
                    .where(User.email == email)
                    .order_by(ConsoleSession.id)
                )
            ).all()
        )


async def _events(db: Database, type_: str) -> list[dict[str, object]]:
    async with db.transaction() as session:
        rows = (await session.scalars(select(Event).where(Event.type == type_))).all()
        return [dict(e.data) for e in rows]


async def test_a_deleted_user_keeps_their_messages_and_loses_every_way_to_act(
    relay: Harness,
) -> None:
    db = relay.relay.db
    await users.add_user(db, ADMIN, PASSWORD, role=Role.ADMIN)
    await relay.send(make_message())
    await _session_for(db, AGENT, "a" * 64)
    async with db.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
    [alias] = (await users.find_user(db, AGENT))[1]

    await users.delete_user(db, AGENT, by=ADMIN)

    async with db.transaction() as session:
        kept = await session.get(Message, message.id)
        row = await session.scalar(select(User).where(User.email == AGENT))
        aliases = (await session.scalars(select(Alias))).all()
    assert kept is not None and row is not None and kept.user_id == row.id
    assert row.deleted_at is not None and row.disabled and row.totp_secret is None
    assert row.notify == {"first_download": False, "expiry_warning": False}
    assert aliases == [] and await _sessions(db, AGENT) == []
    assert await users.authenticate(db, AGENT, "correct horse battery") is None
    assert [u.email for u, _ in await users.list_users(db)] == [ADMIN]
    [deleted] = await _events(db, "user.deleted")
    assert deleted == {"email": AGENT, "aliases": [alias], "sessions": 1, "by": ADMIN}
    # the message's story is still there, and the address stays reserved for it
    async with db.transaction() as session:
        received = await session.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.message_id == message.id, Event.type == "message.received")
        )
    assert received == 1
    with pytest.raises(users.UserConflict, match="deleted user"):
        await users.add_user(db, AGENT, PASSWORD)
    # the freed alias may go to someone else; the deleted user is unknown to every operation
    await users.add_user(db, alias, PASSWORD)
    for operation in (
        users.delete_user(db, AGENT, by=ADMIN),
        users.reset_password(db, AGENT, by=ADMIN),
        users.set_disabled(db, AGENT, False),
        users.change_user(db, AGENT, disabled=False),
        users.add_alias(db, AGENT, "x@broker.example", by=ADMIN),
        users.find_user(db, AGENT),
        totp.enable(db, AGENT),
    ):
        with pytest.raises(users.UserError, match="no user"):
            await operation


async def test_the_last_enabled_admin_stays_and_nobody_deletes_themselves(
    database: Database,
) -> None:
    await users.add_user(database, ADMIN, PASSWORD, role=Role.ADMIN)
    await users.add_user(database, OTHER_ADMIN, PASSWORD, role=Role.ADMIN)
    await users.change_user(database, OTHER_ADMIN, disabled=True)
    before = await _count(database)
    for refused in (
        users.change_user(database, ADMIN, role=Role.AUDITOR),
        users.change_user(database, ADMIN, disabled=True),
        users.set_disabled(database, ADMIN),
        users.delete_user(database, ADMIN, by="cli"),
    ):
        with pytest.raises(users.UserConflict, match="last enabled admin"):
            await refused
    with pytest.raises(users.UserConflict, match="your own account"):
        await users.delete_user(database, ADMIN, by=ADMIN)
    assert await _count(database) == before, "a refusal wrote to the journal"
    user, _ = await users.find_user(database, ADMIN)
    assert user.role == Role.ADMIN and not user.disabled
    # a second enabled admin lets the first go; the disabled one may be deleted any time
    await users.delete_user(database, OTHER_ADMIN, by=ADMIN)
    await users.add_user(database, "new.it@broker.example", PASSWORD, role=Role.ADMIN)
    await users.change_user(database, ADMIN, role=Role.AGENT)
    assert (await users.find_user(database, ADMIN))[0].role == Role.AGENT


async def _count(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Event)) or 0)


async def test_a_reset_password_is_returned_once_and_ends_every_session(
    database: Database,
) -> None:
    await users.add_user(database, "anna@broker.example", PASSWORD)
    await _session_for(database, "anna@broker.example", "b" * 64)
    await _session_for(database, "anna@broker.example", "c" * 64)

    password = await users.reset_password(database, "Anna@Broker.Example", by=ADMIN)

    assert len(password) >= 20
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is None
    assert await users.authenticate(database, "anna@broker.example", password) is not None
    assert await _sessions(database, "anna@broker.example") == []
    [event] = await _events(database, "user.password_reset")
    assert event == {"email": "anna@broker.example", "sessions": 2, "by": ADMIN}
    async with database.transaction() as session:
        journal_text = str((await session.scalars(select(Event.data))).all())
    assert password not in journal_text


async def test_changing_ones_own_password_keeps_only_the_current_session(
    database: Database,
) -> None:
    await users.add_user(database, "anna@broker.example", PASSWORD)
    for sid in ("d" * 64, "e" * 64):
        await _session_for(database, "anna@broker.example", sid)
    await users.set_password(
        database, "anna@broker.example", "another long password", keep_session="e" * 64
    )
    assert await _sessions(database, "anna@broker.example") == ["e" * 64]
    with pytest.raises(users.UserError, match="at least 10"):
        await users.set_password(database, "anna@broker.example", "short")


async def test_aliases_are_added_and_removed_and_stay_unique(database: Database) -> None:
    await users.add_user(database, "anna@broker.example", PASSWORD)
    await users.add_user(database, "ben@broker.example", PASSWORD, aliases=("team@broker.example",))
    assert await users.add_alias(
        database, "anna@broker.example", "Desk@Broker.Example", by=ADMIN
    ) == ["desk@broker.example"]
    agent = await users.authenticate(database, "anna@broker.example", PASSWORD)
    assert agent is not None and agent.may_send_as("desk@broker.example")
    for taken, match in (
        ("team@broker.example", "already an alias"),
        ("desk@broker.example", "already an alias"),
        ("ben@broker.example", "own address"),
    ):
        with pytest.raises(users.UserConflict, match=match):
            await users.add_alias(database, "anna@broker.example", taken, by=ADMIN)
    with pytest.raises(users.UserError, match="not a valid address"):
        await users.add_alias(database, "anna@broker.example", "not an address", by=ADMIN)
    with pytest.raises(users.UnknownUser, match="not an alias"):
        await users.remove_alias(database, "anna@broker.example", "team@broker.example", by=ADMIN)
    assert (
        await users.remove_alias(database, "anna@broker.example", "desk@broker.example", by=ADMIN)
        == []
    )
    agent = await users.authenticate(database, "anna@broker.example", PASSWORD)
    assert agent is not None and not agent.may_send_as("desk@broker.example")
    assert [e["alias"] for e in await _events(database, "user.alias_added")] == [
        "desk@broker.example"
    ]
    assert await _events(database, "user.alias_removed") == [
        {"email": "anna@broker.example", "alias": "desk@broker.example", "by": ADMIN}
    ]


async def test_too_many_aliases_are_refused(database: Database) -> None:
    await users.add_user(
        database,
        "anna@broker.example",
        PASSWORD,
        aliases=tuple(f"a{n}@broker.example" for n in range(users.MAX_ALIASES)),
    )
    with pytest.raises(users.UserConflict, match="aliases already"):
        await users.add_alias(database, "anna@broker.example", "one@broker.example", by=ADMIN)


async def test_a_deleted_sender_is_refused_over_smtp(relay: Harness) -> None:
    await users.delete_user(relay.relay.db, AGENT, by=ADMIN)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await relay.send(make_message())
