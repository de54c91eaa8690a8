"""The "letters waiting" read: held letters only, in the caller's scope, soonest expiry first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway import users
from gateway.access import MessageScope
from gateway.console.waiting import WaitingLetters
from gateway.store.db import Database
from gateway.store.models import Role
from tests.console.seeding import seed_message

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


async def test_held_letters_of_the_scope_soonest_first(database: Database) -> None:
    anna = await users.add_user(database, "anna@broker.example", "x" * 12, group="nord")
    ben = await users.add_user(database, "ben@broker.example", "x" * 12, group="nord")
    carl = await users.add_user(database, "carl@broker.example", "x" * 12, group="sued")
    late = await seed_message(
        database,
        user_id=anna.id,
        received_at=NOW,
        recipients={"late@example.com": "letter_held", "done@example.com": "consented"},
        subject="Spät",
    )
    soon = await seed_message(
        database,
        user_id=ben.id,
        received_at=NOW - timedelta(days=3),
        recipients={"soon@example.com": "letter_held", "gone@example.com": "letter_expired"},
        subject="Bald",
    )
    await seed_message(
        database,
        user_id=carl.id,
        received_at=NOW,
        recipients={"carl-prospect@example.com": "letter_held"},
    )
    waiting = WaitingLetters(database)

    nord = await waiting.listing(MessageScope.for_role(Role.TEAM_LEAD, anna.id, "nord"))
    assert [(w.recipient, w.message_id, w.subject) for w in nord] == [
        ("soon@example.com", soon, "Bald"),
        ("late@example.com", late, "Spät"),
    ]
    assert nord[0].expires_at < nord[1].expires_at
    own = await waiting.listing(MessageScope.for_role(Role.AGENT, anna.id, "nord"))
    assert [w.recipient for w in own] == ["late@example.com"]
    everyone = await waiting.listing(MessageScope(everything=True))
    assert {w.recipient for w in everyone} == {
        "soon@example.com",
        "late@example.com",
        "carl-prospect@example.com",
    }
