"""The state filter and the text search at the query level: each state finds exactly the
messages with a recipient in it, page after page, and PostgreSQL's search reads its trigram
indexes (or, without the extension, still answers)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from gateway import users
from gateway.access import MessageScope
from gateway.console.timeline import MessageFilter, RecipientState, Timeline, _listing
from gateway.store.db import Database
from gateway.store.search_indexes import TRIGRAM_INDEXES
from tests.console.seeding import seed_message

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"

# what seed_message makes of a recipient, and the state the timeline must derive for it
KINDS = {
    "queued": RecipientState.QUEUED,
    "delivered": RecipientState.DELIVERED,
    "bounced": RecipientState.BOUNCED,
    "deleted": RecipientState.DELETED,
    "letter_held": RecipientState.LETTER_WAITING,
    "letter_expired": RecipientState.EXPIRED,
    "consented": RecipientState.CONSENTED,
    "released": RecipientState.RELEASED,
    "link_expired": RecipientState.EXPIRED,
    "letter_revoked": RecipientState.REVOKED,
}


async def _pages(
    timeline: Timeline, scope: MessageScope, filters: MessageFilter, limit: int
) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await timeline.messages(scope, filters, cursor=cursor, limit=limit)
        assert len(page.items) <= limit
        seen += [m.id for m in page.items]
        if page.next_cursor is None:
            return seen
        assert len(page.items) == limit
        cursor = page.next_cursor


async def test_each_state_filter_finds_exactly_its_messages_across_pages(
    database: Database,
) -> None:
    anna = (await users.add_user(database, "anna@broker.example", PASSWORD)).id
    cleo = (await users.add_user(database, "cleo@broker.example", PASSWORD)).id
    kinds = list(KINDS)
    # (received_at, id) -> the kinds of its recipients; every fifth shares its time with
    # the one before, so pages end between messages of the same moment
    mine: dict[tuple[datetime, str], dict[str, str]] = {}
    theirs: list[str] = []
    for i in range(36):
        at = T0 + timedelta(minutes=i - (i % 5 == 0 and i > 0))
        recipients = {f"a{i}@example.com": kinds[i % 10]}
        if i % 2:
            recipients[f"b{i}@example.com"] = kinds[(4 * i + 3) % 10]
        message_id = await seed_message(
            database, user_id=anna, received_at=at, recipients=recipients
        )
        mine[(at, message_id)] = recipients
        if i % 4 == 0:  # another agent's, in many states, never in anna's listing
            theirs.append(kinds[i % 10])
            await seed_message(
                database,
                user_id=cleo,
                received_at=at,
                recipients={f"c{i}@example.com": kinds[i % 10]},
            )
    # the newest: consented letters, whose queued released copies make them candidates for
    # `queued` that the fold then turns down, so that filter walks several rounds
    for i in range(8):
        at = T0 + timedelta(hours=2, minutes=i)
        message_id = await seed_message(
            database, user_id=anna, received_at=at, recipients={f"n{i}@example.com": "consented"}
        )
        mine[(at, message_id)] = {f"n{i}@example.com": "consented"}
    newest_first = sorted(mine, reverse=True)

    def states(at: datetime, message_id: str) -> list[RecipientState]:
        return sorted(KINDS[kind] for kind in mine[(at, message_id)].values())

    def listing(state: RecipientState, since: datetime = T0, words: str = "") -> list[str]:
        return [
            m
            for at, m in newest_first
            if state in states(at, m) and at >= since and any(words in a for a in mine[(at, m)])
        ]

    timeline = Timeline(database)
    scope = MessageScope(user_id=anna)
    for state in RecipientState:
        expected = listing(state)
        assert expected, state
        for limit in (1, 2, 5, 50):
            found = await _pages(timeline, scope, MessageFilter(state=state), limit)
            assert found == expected, (state, limit)
        page = await timeline.messages(scope, MessageFilter(state=state), limit=50)
        for row in page.items:  # each row carries all its recipients, not the matching one
            assert sorted(r.state for r in row.recipients) == states(row.received_at, row.id)
    # with the other filters: the window and the text narrow the same walk
    later = T0 + timedelta(minutes=10)
    window = MessageFilter(state=RecipientState.EXPIRED, since=later, until=T0 + timedelta(1))
    assert await _pages(timeline, scope, window, 1) == listing(RecipientState.EXPIRED, later)
    searched = MessageFilter(state=RecipientState.DELIVERED, text="B1")
    assert await _pages(timeline, scope, searched, 1) == listing(
        RecipientState.DELIVERED, words="b1"
    )
    assert listing(RecipientState.DELIVERED, words="b1")
    # everyone's scope: cleo's messages join the listing, still each once
    bounced = await _pages(
        timeline, MessageScope(everything=True), MessageFilter(state=RecipientState.BOUNCED), 3
    )
    assert (
        len(bounced)
        == len(set(bounced))
        == len(listing(RecipientState.BOUNCED))
        + sum(KINDS[kind] is RecipientState.BOUNCED for kind in theirs)
    )


async def test_postgres_text_search_reads_the_trigram_indexes(database: Database) -> None:
    """The search's query shape lets PostgreSQL answer `ILIKE '%...%'` from the indexes
    (with sequential scans priced out, as a table of 100,000 messages prices them)."""
    anna = (await users.add_user(database, "anna@broker.example", PASSWORD)).id
    villa = await seed_message(
        database,
        user_id=anna,
        received_at=T0,
        recipients={"kauf@interessent.de": "delivered"},
        subject="Villa am See",
    )
    timeline = Timeline(database)
    scope = MessageScope(user_id=anna)
    for words in ("villa AM", "INTERESSENT"):
        assert [
            m.id for m in (await timeline.messages(scope, MessageFilter(text=words))).items
        ] == [villa]
    if not database.is_postgres:  # SQLite has no such index: one scan, see the README
        return
    everything = MessageScope(everything=True)
    query = _listing(everything, MessageFilter(text="interessent"), None, 51, by_index=True)
    compiled = query.compile(database.engine, compile_kwargs={"literal_binds": True})
    async with database.transaction() as session:
        # a handful of rows: a sequential or a plain index scan would win on cost alone
        await session.execute(text("SET LOCAL enable_seqscan = off"))
        await session.execute(text("SET LOCAL enable_indexscan = off"))
        explained = await session.execute(text(f"EXPLAIN {compiled}"))
        plan = "\n".join(row[0] for row in explained)
    for name, _, _ in TRIGRAM_INDEXES:
        assert name in plan, plan


async def test_without_pg_trgm_the_upgrade_succeeds_and_search_still_works(
    database: Database,
) -> None:
    """A role that may not create extensions: the upgrade leaves the trigram indexes out,
    and the search answers all the same."""
    if not database.is_postgres:
        return
    server = make_url(str(database.engine.url.render_as_string(hide_password=False)))
    name = f"sealrelay_notrgm_{secrets.token_hex(4)}"
    role = f"sealrelay_plain_{secrets.token_hex(4)}"
    admin = create_async_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        owner = create_async_engine(server.set(database=name), isolation_level="AUTOCOMMIT")
        async with owner.connect() as conn:  # tables, yes; extensions, no
            await conn.execute(text(f'GRANT CREATE ON SCHEMA public TO "{role}"'))
        await owner.dispose()
        url = server.set(database=name, username=role, password=None)
        db = Database.connect(url.render_as_string(hide_password=False))
        try:
            await db.upgrade()
            async with db.transaction() as session:
                indexes = set(
                    (await session.execute(text("SELECT indexname FROM pg_indexes"))).scalars()
                )
            assert "ix_deliveries_status_message" in indexes
            assert not indexes & {n for n, _, _ in TRIGRAM_INDEXES}
            anna = (await users.add_user(db, "anna@broker.example", PASSWORD)).id
            villa = await seed_message(
                db,
                user_id=anna,
                received_at=T0,
                recipients={"kauf@interessent.de": "delivered"},
                subject="Villa am See",
            )
            found = await Timeline(db).messages(
                MessageScope(user_id=anna), MessageFilter(text="interessent")
            )
            assert [m.id for m in found.items] == [villa]
        finally:
            await db.close()
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        await admin.dispose()
