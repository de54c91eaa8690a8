"""The event catalog: every journal event type declared once, the journal holding every
append to its declaration, no event name spelled anywhere else, and docs/events.md current."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert

from gateway.store import events, journal
from gateway.store.db import Database
from gateway.store.models import Event, utcnow
from tests.support import chained, undeclared_event_types

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("gateway", "web", "rules")

# The names journals already store (each is hashed into the chain) and a CRM reads: never
# renamed, so they are spelled out here as the public contract.
STORED_NAMES = {
    "message.received",
    "policy.kept",
    "language.unsupported",
    "winmail.unpacked",
    "link.created",
    "link.viewed",
    "link.expired",
    "download.first",
    "download.repeat",
    "download.zip",
    "letter.held",
    "letter.viewed",
    "consent.given",
    "letter.released",
    "letter.expired",
    "letter.renewal_requested",
    "delivery.queued",
    "delivery.delivered",
    "delivery.deferred",
    "delivery.bounced",
    "delivery.retried",
    "delivery.deleted",
    "bounce.queued",
    "blobs.deleted",
    "user.created",
    "user.enabled",
    "user.disabled",
    "user.password_changed",
    "console.signed_in",
    "console.sign_in_failed",
    "console.signed_out",
    "console.signed_out_everywhere",
    "user.totp_enabled",
    "user.totp_disabled",
    "api_key.created",
    "api_key.revoked",
    "user.changed",
    # agent actions
    "download.automated",
    "link.revoked",
    "link.extended",
    "letter.resent",
    "letter.released_by_agent",
    "webhook.endpoint_created",
    "webhook.endpoint_changed",
    "webhook.endpoint_disabled",
    "webhook.test",
    "webhook.endpoint_deleted",
    # notifications
    "notice.download_queued",
    "letter.expiry_warned",
    "user.notices_changed",
    # admin-users
    "user.deleted",
    "user.password_reset",
    "user.alias_added",
    "user.alias_removed",
    # trusted-front
    "message.trusted_client",
    # loop-mark
    "message.loop_mark_forged",
    # milter
    "message.milter",
    # agent-logins
    "user.upstream_login_set",
    "user.upstream_login_cleared",
}


def test_the_catalog_declares_exactly_the_stored_names() -> None:
    assert set(events.CATALOG) == STORED_NAMES


def test_every_declaration_says_what_it_means_and_what_each_field_is() -> None:
    for event_type in events.CATALOG.values():
        assert event_type.meaning.strip(), event_type.name
        for field in event_type.fields():
            assert field.meaning.strip(), f"{event_type.name}.{field.name}"


def _event_names_spelled_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in events.CATALOG
    ]


def test_no_event_type_is_spelled_outside_the_catalog() -> None:
    catalog_file = Path(events.__file__).resolve()
    found = [
        hit
        for folder in SOURCES
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.resolve() != catalog_file
        for hit in _event_names_spelled_in(path)
    ]
    assert found == [], (
        "use the gateway.store.events declaration instead of the string:\n" + "\n".join(found)
    )


def test_docs_events_md_is_the_rendered_catalog() -> None:
    rendered = subprocess.run(
        [sys.executable, "-m", "gateway.store.event_docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    written = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    assert rendered == written, (
        "docs/events.md is out of date: run `python -m gateway.store.event_docs > docs/events.md`"
    )


def test_the_docs_name_every_event_and_mark_personal_data() -> None:
    written = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    for name in STORED_NAMES:
        assert f"## `{name}`" in written
    assert "personal data" in written


async def _append(db: Database, new: journal.NewEvent) -> None:
    async with db.transaction() as session:
        await journal.append(session, [new])


async def test_the_journal_refuses_an_undeclared_event(database: Database) -> None:
    with pytest.raises(events.UndeclaredEvent, match=r"'letter\.opened' is not a declared"):
        await _append(database, journal.NewEvent("letter.opened", "m1"))
    assert (await chained(database)) == journal.ChainReport(0)


QUEUED = {"recipient": "p@example.com"}
BROKEN: dict[str, tuple[dict[str, Any], str | None, str | None, str]] = {
    "a field missing": ({}, "m1", "d1", "recipient"),
    "a field too many": ({**QUEUED, "ip": "192.0.2.1"}, "m1", "d1", "ip"),
    "a field of the wrong type": ({"recipient": 7}, "m1", "d1", "recipient"),
    "no message": (QUEUED, None, "d1", "names a message"),
    "no delivery": (QUEUED, "m1", None, "names a delivery"),
}


@pytest.mark.parametrize("case", BROKEN)
async def test_the_journal_refuses_an_event_that_breaks_its_declaration(
    database: Database, case: str
) -> None:
    data, message_id, delivery_id, complaint = BROKEN[case]
    new = journal.NewEvent("delivery.queued", message_id, delivery_id, data)
    with pytest.raises(events.UndeclaredEvent, match=complaint):
        await _append(database, new)
    assert (await chained(database)) == journal.ChainReport(0)


async def test_an_event_without_a_message_refuses_one(database: Database) -> None:
    new = journal.NewEvent("blobs.deleted", "m1", data={"count": 1, "bytes": 10})
    with pytest.raises(events.UndeclaredEvent, match="names no message"):
        await _append(database, new)


async def test_a_declared_event_is_appended_as_declared(database: Database) -> None:
    new = events.DELIVERY_QUEUED.new(QUEUED, message_id="m1", delivery_id="d1")
    assert (new.type, new.message_id, new.delivery_id, new.data) == (
        "delivery.queued",
        "m1",
        "d1",
        QUEUED,
    )
    await _append(database, new)
    assert (await chained(database)) == journal.ChainReport(1)


async def test_the_teardown_check_finds_an_event_written_past_the_journal(
    database: Database,
) -> None:
    """Every database test's teardown runs this check over what the test journaled."""
    row = {"seq": 1, "at": utcnow(), "type": "letter.opened", "data": {}}
    async with database.transaction() as session:
        await session.execute(insert(Event).values(prev_hash="0" * 64, hash="1" * 64, **row))
    assert await undeclared_event_types(database) == ["letter.opened"]
    async with database.transaction() as session:
        await session.execute(delete(Event))
    assert await undeclared_event_types(database) == []
