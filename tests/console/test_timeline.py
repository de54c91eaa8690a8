"""The read model: states per recipient, scope, filters, keyset pages, the event feed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway import users
from gateway.access import MessageScope
from gateway.console.timeline import (
    BadCursor,
    MessageFilter,
    RecipientState,
    Target,
    Timeline,
    encode_cursor,
)
from gateway.store.db import Database
from gateway.store.models import Role
from tests.console.seeding import seed_message

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"


async def _people(db: Database) -> tuple[int, int, int]:
    anna = await users.add_user(db, "anna@broker.example", PASSWORD, group="north")
    bert = await users.add_user(db, "bert@broker.example", PASSWORD, group="north")
    cleo = await users.add_user(db, "cleo@broker.example", PASSWORD, group="south")
    return anna.id, bert.id, cleo.id


async def test_each_state_is_derived_per_recipient(database: Database) -> None:
    anna, _, _ = await _people(database)
    cases = {
        "q@example.com": "queued",
        "d@example.com": "delivered",
        "b@example.com": "bounced",
        "x@example.com": "deleted",
        "w@example.com": "letter_held",
        "e@example.com": "letter_expired",
        "c@example.com": "consented",
        "r@example.com": "released",
        "l@example.com": "link_expired",
    }
    message_id = await seed_message(database, user_id=anna, received_at=T0, recipients=cases)
    page = await Timeline(database).messages(MessageScope(user_id=anna))
    assert [m.id for m in page.items] == [message_id]
    states = {r.address: r.state for r in page.items[0].recipients}
    assert states == {
        "q@example.com": RecipientState.QUEUED,
        "d@example.com": RecipientState.DELIVERED,
        "b@example.com": RecipientState.BOUNCED,
        "x@example.com": RecipientState.DELETED,
        "w@example.com": RecipientState.LETTER_WAITING,
        "e@example.com": RecipientState.EXPIRED,
        "c@example.com": RecipientState.CONSENTED,
        "r@example.com": RecipientState.RELEASED,
        "l@example.com": RecipientState.EXPIRED,
    }
    story = await Timeline(database).message(MessageScope(user_id=anna), message_id)
    assert story is not None
    by_address = {r.address: [e.type for e in r.events] for r in story.recipients}
    assert by_address["b@example.com"] == ["delivery.queued", "delivery.bounced"]
    assert by_address["r@example.com"] == [
        "delivery.queued",
        "delivery.delivered",
        "letter.held",
        "delivery.queued",
        "delivery.delivered",
        "consent.given",
    ]
    assert [e.type for e in story.events] == ["message.received"]
    seqs = [e.seq for r in story.recipients for e in r.events]
    assert len(seqs) == len(set(seqs))


async def test_scope_hides_other_agents_messages(database: Database) -> None:
    anna, bert, cleo = await _people(database)
    mine = await seed_message(
        database, user_id=anna, received_at=T0, recipients={"p@x.de": "delivered"}
    )
    teammate = await seed_message(
        database, user_id=bert, received_at=T0 + timedelta(1), recipients={"p@x.de": "delivered"}
    )
    other = await seed_message(
        database, user_id=cleo, received_at=T0 + timedelta(2), recipients={"p@x.de": "delivered"}
    )
    trusted = await seed_message(
        database, user_id=None, received_at=T0 + timedelta(3), recipients={"p@x.de": "delivered"}
    )
    timeline = Timeline(database)

    async def visible(scope: MessageScope) -> set[str]:
        return {m.id for m in (await timeline.messages(scope)).items}

    assert await visible(MessageScope(user_id=anna)) == {mine}
    assert await visible(MessageScope(group="north")) == {mine, teammate}
    assert await visible(MessageScope.for_role(Role.TEAM_LEAD, cleo, None)) == {other}
    assert await visible(MessageScope(everything=True)) == {mine, teammate, other, trusted}
    assert await timeline.message(MessageScope(user_id=anna), other) is None
    assert await timeline.message(MessageScope(user_id=anna), mine) is not None
    assert await timeline.message(MessageScope(group="north"), other) is None
    assert await timeline.message(MessageScope(user_id=anna), "nonexistent") is None
    feed = await timeline.events(MessageScope(user_id=anna), limit=1000)
    assert feed and {e.message_id for e in feed} == {mine}
    assert await timeline.events(MessageScope(user_id=anna), message_id=other) == []
    everything = await timeline.events(MessageScope(everything=True), limit=1000)
    assert {e.message_id for e in everything} >= {mine, teammate, other, trusted}
    assert any(e.message_id is None for e in everything)  # user.created


async def test_filters(database: Database) -> None:
    anna, _, _ = await _people(database)
    scope = MessageScope(user_id=anna)
    a = await seed_message(
        database,
        user_id=anna,
        received_at=T0,
        recipients={"kauf@interessent.de": "delivered"},
        subject="Villa am See",
    )
    b = await seed_message(
        database,
        user_id=anna,
        received_at=T0 + timedelta(1),
        recipients={"mieter@example.com": "letter_held"},
        subject="Wohnung 100%_sicher",
    )
    c = await seed_message(
        database,
        user_id=anna,
        received_at=T0 + timedelta(2),
        recipients={"x@example.com": "bounced", "y@example.com": "delivered"},
        subject="Haus",
    )
    timeline = Timeline(database)

    async def ids(**kw: object) -> list[str]:
        return [m.id for m in (await timeline.messages(scope, MessageFilter(**kw))).items]  # type: ignore[arg-type]

    assert await ids(text="VILLA") == [a]
    assert await ids(text="interessent") == [a]
    assert await ids(text="100%_") == [b]
    assert await ids(text="%") == [b]
    assert await ids(state=RecipientState.LETTER_WAITING) == [b]
    assert await ids(state=RecipientState.BOUNCED) == [c]
    assert await ids(state=RecipientState.DELIVERED) == [c, a]
    assert await ids(since=T0 + timedelta(1)) == [c, b]
    assert await ids(until=T0 + timedelta(1)) == [a]
    assert await ids(text="haus", state=RecipientState.DELIVERED) == [c]


async def test_keyset_pages_lose_and_repeat_nothing_under_concurrent_inserts(
    database: Database,
) -> None:
    anna, _, _ = await _people(database)
    scope = MessageScope(user_id=anna)
    same_time = T0 + timedelta(hours=1)
    existing = [
        await seed_message(
            database,
            user_id=anna,
            received_at=same_time if i % 3 == 0 else T0 + timedelta(minutes=i),
            recipients={"p@example.com": "delivered"},
        )
        for i in range(25)
    ]
    timeline = Timeline(database)
    seen: list[str] = []
    cursor = None
    inserted: list[str] = []
    while True:
        page = await timeline.messages(scope, cursor=cursor, limit=4)
        seen += [m.id for m in page.items]
        # while the client pages, mail keeps arriving: newer than anything listed so far,
        # and at the very moment the page ended on
        newer, same = await asyncio.gather(
            seed_message(
                database,
                user_id=anna,
                received_at=T0 + timedelta(days=1, minutes=len(seen)),
                recipients={"n@example.com": "queued"},
            ),
            seed_message(
                database,
                user_id=anna,
                received_at=datetime.now(UTC) + timedelta(days=400),
                recipients={"n@example.com": "queued"},
            ),
        )
        inserted += [newer, same]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(existing)
    everything = [m.id for m in (await timeline.messages(scope, limit=200)).items]
    assert sorted(everything) == sorted(existing + inserted)


async def test_a_bad_cursor_is_refused(database: Database) -> None:
    timeline = Timeline(database)
    scope = MessageScope(everything=True)
    for bad in ["nonsense", "!!!", "123", "12.XYZ", "1.", ".ab", "123456789012345678.ab"]:
        with pytest.raises(BadCursor):
            await timeline.messages(scope, cursor=bad)
    assert (await timeline.messages(scope, cursor=encode_cursor(T0, "ab12"))).items == []


async def test_the_feed_continues_exactly_after_a_sequence_number(database: Database) -> None:
    anna, _, _ = await _people(database)
    for i in range(5):
        await seed_message(
            database,
            user_id=anna,
            received_at=T0 + timedelta(minutes=i),
            recipients={"p@example.com": "delivered"},
        )
    timeline = Timeline(database)
    scope = MessageScope(everything=True)
    whole = await timeline.events(scope, limit=1000)
    assert [e.seq for e in whole] == sorted(e.seq for e in whole)
    read: list[int] = []
    after = 0
    while batch := await timeline.events(scope, after_seq=after, limit=3):
        read += [e.seq for e in batch]
        after = batch[-1].seq
    assert read == [e.seq for e in whole]
    received = await timeline.events(scope, types=["message.received"], limit=1000)
    assert len(received) == 5 and {e.type for e in received} == {"message.received"}
    late = await timeline.events(
        scope, since=T0 + timedelta(minutes=3), until=T0 + timedelta(days=1), limit=1000
    )
    assert {e.at for e in late} == {T0 + timedelta(minutes=3), T0 + timedelta(minutes=4)}


async def test_in_scope_answers_for_messages_letters_and_links(database: Database) -> None:
    """The one check before an agent's action: a letter or link counts as its message."""
    anna, bert, cleo = await _people(database)
    recipients = {"w@example.com": "letter_held", "l@example.com": "link_expired"}
    north = await seed_message(database, user_id=anna, received_at=T0, recipients=recipients)
    south = await seed_message(database, user_id=cleo, received_at=T0, recipients=recipients)
    timeline = Timeline(database)
    targets: dict[str, list[tuple[Target, str]]] = {}
    for message_id in (north, south):
        story = await timeline.message(MessageScope(everything=True), message_id)
        assert story is not None
        by_address = {r.address: r for r in story.recipients}
        [letter] = by_address["w@example.com"].letters
        [link] = by_address["l@example.com"].links
        assert letter.status == "held" and link.kind == "download"
        targets[message_id] = [
            (Target.MESSAGE, message_id),
            (Target.LETTER, letter.id),
            (Target.LINK, link.id),
        ]
    scopes = {
        "anna": MessageScope.for_role(Role.AGENT, anna, "north"),
        "bert": MessageScope.for_role(Role.AGENT, bert, "north"),
        "north lead": MessageScope.for_role(Role.TEAM_LEAD, bert, "north"),
        "auditor": MessageScope.for_role(Role.AUDITOR, bert, None),
    }
    sees = {"anna": {north}, "bert": set(), "north lead": {north}, "auditor": {north, south}}
    for who, scope in scopes.items():
        for message_id, kinds in targets.items():
            for target, target_id in kinds:
                expected = message_id in sees[who]
                assert await timeline.in_scope(scope, target, target_id) is expected, (
                    who,
                    target,
                )
    for target in Target:
        assert not await timeline.in_scope(MessageScope(everything=True), target, "nosuch")
    # a letter's id is not a link's, nor a message's
    assert not await timeline.in_scope(scopes["auditor"], Target.LINK, targets[north][1][1])
