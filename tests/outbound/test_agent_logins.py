"""Agents' own upstream logins: their mail leaves through their account, the rest does not.

A real relay (its default upstream the conftest sink) and a second smart host that insists on
TLS and AUTH with the agent's own credentials, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from gateway import users
from gateway.agent_logins import (
    AgentLogins,
    LoginKeyMissing,
    LoginUnreadable,
    SecretBox,
    check_url,
    key_path,
)
from gateway.config_check import settings_problems
from gateway.store.db import Database
from gateway.store.models import AgentLogin, DeliveryStatus, Event, User
from gateway.users import UnknownUser, UserError
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, make_message, relay_settings
from tests.letter_site import PROSPECT, LetterSite
from tests.outbound.test_delivery import (
    SecureSink,
    _when,
    all_in,
    deliveries,
    delivery_to,
    eventually,
    queued_id,
    server_tls,
)
from tests.support import Received

OTHER = "other@broker.example"
HOSTER_USER = "anna@webhoster.example"
HOSTER_SECRET = "hoster secret 7 üñ"
ADMIN = "admin@broker.example"


@pytest.fixture
async def hoster(tls_files: tuple[Path, Path]) -> AsyncIterator[SecureSink]:
    """The agent's web hoster: STARTTLS, then AUTH with the agent's own account."""
    server = SecureSink(tls=server_tls(*tls_files))
    server.accounts[HOSTER_USER] = HOSTER_SECRET
    await server.start()
    yield server
    await server.stop()


async def send_as(harness: Harness, sender: str, to: str) -> str:
    message = make_message(to=to)
    message.replace_header("From", sender)
    async with harness.client(username=sender, password=PASSWORD) as client:
        response = await client.send_message(message, sender=sender)
    return queued_id(response[1])


async def everything_stored(db: Database) -> str:
    """The journal and the login rows as text, to look for a secret in."""
    async with db.transaction() as session:
        rows = (await session.scalars(select(Event))).all()
        logins = (await session.scalars(select(AgentLogin))).all()
    return repr([(e.type, e.data) for e in rows]) + repr(
        [(x.url, x.username, x.ciphertext) for x in logins]
    )


def assert_no_secret(text: str | bytes) -> None:
    raw = text.encode() if isinstance(text, str) else text
    for form in (HOSTER_SECRET.encode(), base64.b64encode(HOSTER_SECRET.encode())):
        assert form not in raw


def relay_logs(caplog: pytest.LogCaptureFixture) -> str:
    """What the relay logged (the test smart host's own protocol log is not the relay's)."""
    return "\n".join(
        r.getMessage() + (r.exc_text or "")
        for r in caplog.records
        if not r.name.startswith("mail.log")
    )


async def test_agent_mail_leaves_through_their_own_login_and_nothing_else_does(
    relay_factory: StartRelay,
    hoster: SecureSink,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await users.add_user(database, OTHER, PASSWORD)
    harness = await relay_factory()
    await harness.relay.agent_logins.set(
        AGENT, f"smtp://127.0.0.1:{hoster.port}", HOSTER_USER, HOSTER_SECRET, by=ADMIN
    )
    hoster.refuse["gone@example.com"] = "550 5.1.1 no such mailbox"

    mine = await send_as(harness, AGENT, "p@example.com")
    theirs = await send_as(harness, OTHER, "q@example.com")
    bounced = await send_as(harness, AGENT, "gone@example.com")

    [copy] = await hoster.expect(1)
    assert copy.rcpt_tos == ["p@example.com"] and hoster.logins == [HOSTER_USER]
    assert hoster.encrypted == [True]
    await harness.sink.expect(2)
    assert [m.rcpt_tos for m in harness.sink.to("q@example.com")] == [["q@example.com"]]
    # the DSN about the refused copy is the relay's own mail: it goes the default way
    [dsn] = harness.sink.to(AGENT)
    assert b"gone@example.com" in dsn.data
    assert hoster.to(AGENT) == []

    await eventually(
        lambda: _when(deliveries(database, mine), lambda r: all_in({DeliveryStatus.DELIVERED}, r))
    )
    async with database.transaction() as session:
        rows = await session.scalars(select(Event).where(Event.type == "delivery.delivered"))
        delivered = {e.message_id: e.data for e in rows}
    assert delivered[mine]["route"] == "agent-login"
    assert delivered[theirs]["route"] == "default"
    assert (await delivery_to(database, "gone@example.com", bounced)).status == "bounced"

    assert_no_secret(await everything_stored(database))
    assert_no_secret(relay_logs(caplog))
    assert f"relay=agent-login 127.0.0.1:{hoster.port}" in relay_logs(caplog)


async def test_a_changed_login_is_used_at_once_and_a_wrong_one_defers(
    relay_factory: StartRelay,
    hoster: SecureSink,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = await relay_factory()
    logins = harness.relay.agent_logins
    url = f"smtp://127.0.0.1:{hoster.port}"
    await logins.set(AGENT, url, HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    await send_as(harness, AGENT, "p@example.com")
    await hoster.expect(1)

    await logins.set(AGENT, url, HOSTER_USER, "not the password", by=ADMIN)
    second = await send_as(harness, AGENT, "q@example.com")
    delivery = await eventually(
        lambda: _when(delivery_to(database, "q@example.com", second), lambda d: d.attempts >= 1)
    )
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.last_error is not None and delivery.last_error.startswith("login refused:")
    assert "535" in delivery.last_error and "not the password" not in delivery.last_error
    assert len(hoster.messages) == 1 and harness.sink.messages == []
    assert "not the password" not in relay_logs(caplog)

    await logins.set(AGENT, url, HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    await hoster.expect(2)


async def test_a_login_moved_to_another_user_does_not_open(
    relay_factory: StartRelay,
    hoster: SecureSink,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await users.add_user(database, OTHER, PASSWORD)
    harness = await relay_factory()
    logins = harness.relay.agent_logins
    url = f"smtp://127.0.0.1:{hoster.port}"
    await logins.set(AGENT, url, HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    await logins.set(OTHER, url, "other@webhoster.example", "other secret 9", by=ADMIN)
    async with database.transaction() as session:
        rows = {r.user_id: r for r in (await session.scalars(select(AgentLogin))).all()}
        agent_id, other_id = sorted(rows)
        sealed_agent, sealed_other = rows[agent_id].ciphertext, rows[other_id].ciphertext
        assert HOSTER_SECRET.encode() not in sealed_agent
        await session.execute(
            update(AgentLogin).where(AgentLogin.user_id == agent_id).values(ciphertext=sealed_other)
        )
        await session.execute(
            update(AgentLogin).where(AgentLogin.user_id == other_id).values(ciphertext=sealed_agent)
        )

    with pytest.raises(LoginUnreadable, match="does not open"):
        await logins.open(agent_id)
    sent = await send_as(harness, AGENT, "p@example.com")
    delivery = await eventually(
        lambda: _when(delivery_to(database, "p@example.com", sent), lambda d: d.attempts >= 1)
    )
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("agent login unusable:")
    assert hoster.messages == [] and harness.sink.messages == []
    assert "cannot be used" in relay_logs(caplog)


async def test_a_missing_key_with_stored_logins_is_a_clear_error(
    relay_factory: StartRelay,
    hoster: SecureSink,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = await relay_factory()
    logins = harness.relay.agent_logins
    await logins.set(AGENT, f"smtp://127.0.0.1:{hoster.port}", HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    key_file = key_path(harness.settings)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key_file.unlink()

    fresh = AgentLogins(database, key_file)
    problem = await fresh.key_problem()
    assert problem is not None and str(key_file) in problem and "1 agents'" in problem
    async with database.transaction() as session:
        user_id = await session.scalar(select(User.id).where(User.email == AGENT))
    assert user_id is not None
    with pytest.raises(LoginKeyMissing, match="restore it from the backup"):
        await fresh.open(user_id)
    # setting another login must not make a new key that orphans the stored one
    with pytest.raises(LoginKeyMissing):
        await fresh.set(AGENT, "smtp://mail.example", HOSTER_USER, "x" * 12, by=ADMIN)
    assert not key_file.exists()


async def test_set_refuses_bad_input_and_writes_nothing(
    relay_factory: StartRelay, database: Database
) -> None:
    harness = await relay_factory()
    logins = harness.relay.agent_logins
    for url in ("http://mail.example", "smtp://", "smtp://u:p@mail.example", "smtp://m.example/x"):
        with pytest.raises(UserError):
            await logins.set(AGENT, url, HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    with pytest.raises(UserError):
        await logins.set(AGENT, "smtp://mail.example", " ", HOSTER_SECRET, by=ADMIN)
    with pytest.raises(UserError):
        await logins.set(AGENT, "smtp://mail.example", HOSTER_USER, "", by=ADMIN)
    with pytest.raises(UnknownUser):
        await logins.set("nobody@broker.example", "smtp://mail.example", "u", "p", by=ADMIN)
    assert await logins.count() == 0
    assert "upstream_login" not in await everything_stored(database)
    assert await logins.clear(AGENT, by=ADMIN) is False


def test_sealed_values_are_bound_to_their_user() -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.seal(1, HOSTER_SECRET)
    assert box.open(1, sealed) == HOSTER_SECRET
    assert box.seal(1, HOSTER_SECRET) != sealed  # a fresh nonce each time
    with pytest.raises(LoginUnreadable) as raised:
        box.open(2, sealed)
    assert HOSTER_SECRET not in str(raised.value)
    with pytest.raises(LoginUnreadable):
        SecretBox(b"j" * 32).open(1, sealed)
    assert check_url("smtps://Mail.Example:465/") == "smtps://Mail.Example:465"


async def test_a_rotated_key_opens_every_login_and_a_running_relay_follows(
    relay_factory: StartRelay, hoster: SecureSink, database: Database
) -> None:
    await users.add_user(database, OTHER, PASSWORD)
    harness = await relay_factory()
    running = harness.relay.agent_logins
    url = f"smtp://127.0.0.1:{hoster.port}"
    await running.set(AGENT, url, HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    await running.set(OTHER, url, "other@webhoster.example", "other secret 9", by=ADMIN)
    key_file = key_path(harness.settings)
    before = key_file.read_bytes()
    async with database.transaction() as session:
        sealed_before = {r.user_id: r.ciphertext for r in await session.scalars(select(AgentLogin))}

    # another process (the CLI) rotates; the running relay still holds the old key
    assert await AgentLogins(database, key_file).rotate_key() == 2
    assert key_file.read_bytes() != before
    assert key_file.with_name(key_file.name + ".old").read_bytes() == before
    assert not key_file.with_name(key_file.name + ".new").exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    async with database.transaction() as session:
        for row in await session.scalars(select(AgentLogin)):
            assert row.ciphertext != sealed_before[row.user_id]
    with pytest.raises(LoginUnreadable):
        SecretBox(before).open(row.user_id, row.ciphertext)
    assert SecretBox(before).open(row.user_id, sealed_before[row.user_id])  # the old row did

    await send_as(harness, AGENT, "p@example.com")
    [copy] = await hoster.expect(1)
    assert copy.rcpt_tos == ["p@example.com"] and hoster.logins == [HOSTER_USER]


def test_config_check_looks_at_the_key_file_without_showing_it(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "logins.key"
    settings = relay_settings(tmp_path, 25, secrets={"key_file": str(key_file)})
    assert key_path(settings) == key_file
    assert key_path(relay_settings(tmp_path, 25)) == tmp_path / "agent-logins.key"

    def findings() -> list[str]:
        return [str(p) for p in settings_problems(settings) if p.key == "secrets.key_file"]

    assert findings() == [], "a missing key is made when the first login is set"
    key_file.parent.mkdir()
    key_file.write_bytes(b"k" * 31)
    key_file.chmod(0o600)
    assert findings() == [f"secrets.key_file: {key_file} must hold exactly 32 bytes"]
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o644)
    [warning] = [p for p in settings_problems(settings) if p.key == "secrets.key_file"]
    assert not warning.error and "chmod 600" in warning.text and "kkkk" not in warning.text
    with pytest.raises(ValueError, match=r"secrets\.key_file"):
        relay_settings(tmp_path, 25, secrets={"key_file": 1})


async def test_a_released_original_leaves_through_the_login_and_the_confirmations_do_not(
    site: LetterSite, hoster: SecureSink
) -> None:
    token, _ = await site.send_offer()  # the letter left before the login was set
    await site.relay.agent_logins.set(
        AGENT, f"smtp://127.0.0.1:{hoster.port}", HOSTER_USER, HOSTER_SECRET, by=ADMIN
    )
    before = len(site.sink.messages)
    assert (await site.consent(token)).status == 303

    [original] = await hoster.expect(1)
    assert original.rcpt_tos == [PROSPECT] and b"X-Sealrelay-Consent" in original.data
    assert hoster.logins == [HOSTER_USER]

    async def confirmation_to_agent() -> list[Received]:
        return site.sink.to(AGENT)[-1:] if len(site.sink.messages) > before else []

    [confirmation] = await eventually(confirmation_to_agent)
    assert b"X-Sealrelay-Consent" not in confirmation.data.split(b"\r\n\r\n", 1)[0]
    assert hoster.to(AGENT) == []


async def test_deleting_a_user_removes_their_login(
    relay_factory: StartRelay, database: Database
) -> None:
    harness = await relay_factory()
    logins = harness.relay.agent_logins
    await logins.set(AGENT, "smtp://mail.webhoster.example", HOSTER_USER, HOSTER_SECRET, by=ADMIN)
    await users.delete_user(database, AGENT, by=ADMIN)
    assert await logins.count() == 0
    with pytest.raises(UnknownUser):
        await logins.show(AGENT)
