"""The admin side of the queue, users and config: the real `sealrelay` script, and the queue
functions behind it on both databases.

Each CLI call is a new Python process (about a second of start-up), so calls that do not
depend on each other run concurrently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import users
from gateway.outbound import queue
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Delivery, DeliveryStatus, Event, Message, new_id, utcnow
from sealrelay.commands.queue import shown_subject
from tests.cli_runner import sealrelay, sqlite_url, write_config
from tests.conftest import AGENT
from tests.support import LETTER_TOML, chained

LIFETIME = timedelta(days=5)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "cli")


# -- a queue with one copy in each state -----------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    message: str
    fresh: str
    deferred: str
    bounced: str
    delivered: str


async def seed_queue(db: Database, blob: str = "0" * 64) -> Seeded:
    """Through the queue's own functions: claimed, then deferred, bounced and delivered,
    all naming `blob` (by default bytes no store holds)."""
    now = utcnow()
    message = Message(
        id=new_id(),
        sender=AGENT,
        blob=blob,
        size=100,
        message_id_header="<offer@broker.example>",
        subject="Exposé Lindenstraße 5",
        received_at=now,
    )

    def copy(name: str) -> Delivery:
        return Delivery(
            id=new_id(),
            message_id=message.id,
            recipient=f"{name}@example.com",
            blob=blob,
            next_attempt_at=now,
            expires_at=now + LIFETIME,
        )

    deferred, bounced, delivered = copy("deferred"), copy("bounced"), copy("delivered")
    async with db.transaction() as session:
        session.add(message)
        await session.flush()
        session.add_all([deferred, bounced, delivered])
    async with db.transaction() as session:
        claimed = {
            c.delivery.id: c.delivery for c in await queue.claim(session, "seed", now, LIFETIME, 10)
        }
        assert len(claimed) == 3
        events = [
            await queue.mark_deferred(
                session,
                claimed[deferred.id],
                "seed",
                now,
                "451 4.3.0 try again later",
                now + timedelta(hours=1),
            ),
            await queue.mark_bounced(
                session, claimed[bounced.id], "seed", now, "550 5.1.1 no such user", status="5.1.1"
            ),
            await queue.mark_delivered(session, claimed[delivered.id], "seed", now, "mx"),
        ]
        await journal.append(session, [e for e in events if e is not None], now)
    fresh = copy("fresh")
    fresh.next_attempt_at = now - timedelta(seconds=1)
    async with db.transaction() as session:
        session.add(fresh)
    return Seeded(message.id, fresh.id, deferred.id, bounced.id, delivered.id)


async def rows_by_id(db: Database) -> dict[str, Delivery]:
    async with db.transaction() as session:
        return {d.id: d for d in (await session.scalars(select(Delivery))).all()}


async def event_types(db: Database) -> list[tuple[str, str | None]]:
    async with db.transaction() as session:
        rows = (await session.scalars(select(Event).order_by(Event.id))).all()
    return [(e.type, e.delivery_id) for e in rows]


# -- the queue functions, on both databases --------------------------------------------------


async def test_queue_functions_list_retry_and_delete(database: Database) -> None:
    seeded = await seed_queue(database)
    async with database.transaction() as session:
        waiting = await queue.list_deliveries(session)
        everything = await queue.list_deliveries(session, list(DeliveryStatus))
    assert [c.delivery.id for c in waiting] == [seeded.fresh, seeded.deferred]
    assert {c.delivery.id for c in everything} == {
        seeded.fresh,
        seeded.deferred,
        seeded.bounced,
        seeded.delivered,
    }
    assert all(c.message.id == seeded.message for c in everything)

    now = utcnow()
    async with database.transaction() as session:
        await queue.retry_now(session, seeded.deferred, now, LIFETIME)
        await queue.retry_now(session, seeded.bounced, now, LIFETIME)
        await queue.delete(session, seeded.fresh, now)
    for call in (
        lambda s: queue.retry_now(s, seeded.delivered, now, LIFETIME),
        lambda s: queue.delete(s, seeded.delivered, now),
        lambda s: queue.delete(s, seeded.fresh, now),
        lambda s: queue.retry_now(s, "nope", now, LIFETIME),
        lambda s: queue.delete(s, "nope", now),
    ):
        with pytest.raises(queue.QueueError):
            async with database.transaction() as session:
                await call(session)

    rows = await rows_by_id(database)
    deferred, bounced = rows[seeded.deferred], rows[seeded.bounced]
    assert deferred.status == DeliveryStatus.QUEUED and deferred.next_attempt_at == now
    assert deferred.attempts == 1 and deferred.leased_by is None
    assert bounced.status == DeliveryStatus.QUEUED and bounced.next_attempt_at == now
    assert bounced.expires_at == now + LIFETIME
    assert rows[seeded.fresh].status == DeliveryStatus.DELETED
    assert rows[seeded.delivered].status == DeliveryStatus.DELIVERED
    assert (await event_types(database))[-3:] == [
        ("delivery.retried", seeded.deferred),
        ("delivery.retried", seeded.bounced),
        ("delivery.deleted", seeded.fresh),
    ]
    assert (await chained(database)).ok
    async with database.transaction() as session:
        again = await queue.claim(session, "worker", now, timedelta(minutes=5), 10)
    assert {c.delivery.id for c in again} == {seeded.deferred, seeded.bounced}


# -- the CLI ---------------------------------------------------------------------------------


async def test_cli_queue_list_retry_delete(config: Path, tmp_path: Path) -> None:
    db = Database.connect(sqlite_url(config))
    await db.upgrade()
    kept = await LocalBlobStore(config.parent / "blobs").put(b"Subject: x\r\n\r\nhello\r\n")
    seeded = await seed_queue(db, kept)
    await db.close()
    cfg = ("-c", str(config))
    empty = write_config(tmp_path / "empty")
    assert (await sealrelay("db", "upgrade", "-c", str(empty))).code == 0

    waiting, nothing, unknown = await asyncio.gather(
        sealrelay("queue", "list", *cfg),
        sealrelay("queue", "list", "-c", str(empty)),
        sealrelay("queue", "retry", "nope", *cfg),
    )
    assert (nothing.code, nothing.out) == (0, "the queue is empty\n")
    assert (unknown.code, unknown.out) == (1, "")
    assert unknown.error_line == "Error: no message nope in the queue"
    assert waiting.code == 0, waiting.err
    # One id: the message's, as in the 250 reply; its copies are listed under it.
    head, fresh_line, deferred_line = waiting.out.splitlines()
    assert head.startswith(f"{seeded.message}  ")
    assert head.endswith(f"Z  {AGENT}  'Exposé Lindenstraße 5'")
    assert fresh_line.startswith("    queued    fresh@example.com  attempts=0  next=")
    assert "last error" not in fresh_line
    assert deferred_line.startswith("    queued    deferred@example.com  attempts=1  next=")
    assert deferred_line.endswith("last error: 451 4.3.0 try again later")

    m = seeded.message
    delivered_again, retried, deleted = await asyncio.gather(
        sealrelay("queue", "delete", m, "delivered@example.com", *cfg),
        sealrelay("queue", "retry", m, "deferred@example.com", "Bounced@Example.com", *cfg),
        sealrelay("queue", "delete", m, "fresh@example.com", *cfg),
    )
    assert delivered_again.code == 1
    assert delivered_again.error_line == f"Error: message {m} has no queued copy to delete"
    assert retried.code == 0, retried.err
    assert sorted(retried.out.splitlines()) == [
        f"{m}: bounced@example.com will be retried now (a running relay picks it up)",
        f"{m}: deferred@example.com will be retried now (a running relay picks it up)",
    ]
    assert (deleted.code, deleted.out) == (0, f"{m}: fresh@example.com deleted\n")

    db = Database.connect(sqlite_url(config))
    try:
        rows = await rows_by_id(db)
        assert rows[seeded.deferred].status == DeliveryStatus.QUEUED
        assert rows[seeded.deferred].next_attempt_at <= utcnow()
        assert rows[seeded.bounced].status == DeliveryStatus.QUEUED
        assert rows[seeded.bounced].expires_at > utcnow() + LIFETIME - timedelta(minutes=1)
        assert rows[seeded.fresh].status == DeliveryStatus.DELETED
        assert rows[seeded.delivered].status == DeliveryStatus.DELIVERED
        types = [t for t, _ in await event_types(db)]
        assert types.count("delivery.retried") == 2 and types.count("delivery.deleted") == 1
        assert (await chained(db)).ok
    finally:
        await db.close()


async def test_cli_user_commands(config: Path) -> None:
    cfg = ("-c", str(config))
    password, new_password = "a long enough password", "another long password"
    anna, boss = "anna@broker.example", "boss@broker.example"

    added, generated = await asyncio.gather(
        sealrelay("user", "add", "Anna@Broker.example", "--password-stdin", *cfg,
                  stdin=password + "\n"),
        sealrelay("user", "add", boss, "--admin", "--group", "sales",
                  "--alias", "team@broker.example", *cfg),
    )  # fmt: skip
    assert (added.code, added.out) == (0, f"created agent {anna}\n")
    assert generated.code == 0, generated.err
    created, password_line = generated.out.splitlines()
    assert created == f"created admin {boss}"
    first = password_line.removeprefix("password: ")
    assert password_line.startswith("password: ") and len(first) >= 16

    db = Database.connect(sqlite_url(config))
    try:
        assert await users.authenticate(db, anna, password) is not None
        assert await users.authenticate(db, boss, first) is not None

        disabled, changed = await asyncio.gather(
            sealrelay("user", "disable", anna, *cfg),
            sealrelay("user", "passwd", boss, "--password-stdin", *cfg, stdin=new_password),
        )
        assert (disabled.code, disabled.out) == (0, f"disabled {anna}\n")
        assert (changed.code, changed.out) == (0, f"password changed for {boss}\n")
        assert await users.authenticate(db, anna, password) is None
        assert await users.authenticate(db, boss, first) is None
        assert await users.authenticate(db, boss, new_password) is not None

        listed, regenerated = await asyncio.gather(
            sealrelay("user", "list", *cfg), sealrelay("user", "passwd", boss, *cfg)
        )
        assert listed.out == (
            f"{anna}  [agent disabled]\n{boss}  [admin group=sales]  aliases: team@broker.example\n"
        )
        changed_line, new_line = regenerated.out.splitlines()
        assert changed_line == f"password changed for {boss}"
        second = new_line.removeprefix("password: ")
        assert new_line.startswith("password: ") and second not in (first, new_password)
        agent = await users.authenticate(db, boss, second)
        assert agent is not None and agent.is_admin and agent.group == "sales"
        assert agent.may_send_as("team@broker.example")

        enabled = await sealrelay("user", "enable", anna, *cfg)
        assert (enabled.code, enabled.out) == (0, f"enabled {anna}\n")
        agent = await users.authenticate(db, anna, password)
        assert agent is not None and not agent.is_admin
    finally:
        await db.close()


async def test_check_config_names_the_bad_key(tmp_path: Path, dkim_key_file: Path) -> None:
    good = write_config(
        tmp_path,
        "good.toml",
        "[smtp]\n"
        'listen = ["127.0.0.1:2587"]\n'
        "allow_plaintext_auth_on_loopback = true\n"
        "[upstream]\n"
        'url = "smtp://smarthost.example:587"\n'
        '[dkim."broker.example"]\n'
        'selector = "s2026"\n'
        f'key_file = "{dkim_key_file}"\n' + LETTER_TOML,
    )
    bad = write_config(
        tmp_path,
        "bad.toml",
        "[smtp]\nmax_recipients = 0\n[upstream]\nurl = 'smtp://smarthost.example:587'\n",
    )
    ok, value, env = await asyncio.gather(
        sealrelay("check-config", str(good)),
        sealrelay("check-config", str(bad)),
        sealrelay("check-config", str(good), env={"SEALRELAY_SMTP__MAX_RECIPIENTS": "abc"}),
    )
    assert ok.code == 0, ok.err
    assert ok.out == (
        f"{good}: ok (smtp 127.0.0.1:2587; web 127.0.0.1:8080;"
        " upstream smtp://smarthost.example:587; dkim for 1 domain(s))\n"
    )
    assert (value.code, value.out) == (1, "")
    assert value.error_line == (
        "Error: config error: smtp.max_recipients: Input should be greater than or equal to 1"
    )
    assert (env.code, env.out) == (1, "")
    assert env.error_line.startswith("Error: config error: smtp.max_recipients: ")
    assert env.error_line.endswith("(from SEALRELAY_SMTP__MAX_RECIPIENTS)")


async def test_a_copy_being_sent_cannot_be_retried_or_deleted(database: Database) -> None:
    seeded = await seed_queue(database)
    now = utcnow()
    async with database.transaction() as session:
        [claimed] = await queue.claim(session, "busy-worker", now, timedelta(minutes=5), 10)
    assert claimed.delivery.id == seeded.fresh
    for action in (
        lambda s: queue.retry_now(s, seeded.fresh, now, LIFETIME),
        lambda s: queue.delete(s, seeded.fresh, now),
    ):
        with pytest.raises(queue.QueueError, match="being sent right now"):
            async with database.transaction() as session:
                await action(session)
    row = (await rows_by_id(database))[seeded.fresh]
    assert row.leased_by == "busy-worker" and row.status == DeliveryStatus.QUEUED
    # Once the lease has lapsed (the worker died), the admin may act.
    later = now + timedelta(minutes=6)
    async with database.transaction() as session:
        await queue.retry_now(session, seeded.fresh, later, LIFETIME)


async def test_cli_will_not_retry_a_bounced_copy_whose_bytes_are_gone(config: Path) -> None:
    """Past [storage] keep_originals_days the sweep deletes a bounced copy's bytes: a retry
    would queue a copy that can only fail until it expires, so it is refused and nothing
    changes."""
    db = Database.connect(sqlite_url(config))
    await db.upgrade()
    seeded = await seed_queue(db)  # names bytes the store does not hold
    await db.close()
    gone = await sealrelay(
        "queue", "retry", seeded.message, "bounced@example.com", "-c", str(config)
    )
    assert gone.code == 1
    assert gone.error_line == (
        "Error: the copy to bounced@example.com is no longer kept (deleted by the sweep after"
        " [storage] keep_originals_days); nothing to retry"
    )
    db = Database.connect(sqlite_url(config))
    try:
        assert (await rows_by_id(db))[seeded.bounced].status == DeliveryStatus.BOUNCED
        assert "delivery.retried" not in [t for t, _ in await event_types(db)]
    finally:
        await db.close()


def test_a_long_subject_is_cut_with_an_ellipsis_and_controls_are_escaped() -> None:
    long = "Einwilligung erteilt: Musterstraße 5 – omar@example.org"
    assert shown_subject(long) == repr(long[:39] + "…")
    assert shown_subject("Exposé\x1b[2J") == "'Exposé\\x1b[2J'"
