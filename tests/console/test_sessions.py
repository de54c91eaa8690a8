"""The session desk on both databases, with a clock the tests move: no sleeps."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from sqlalchemy import select

from gateway import users
from gateway.config import ConsoleSettings, SmtpSettings
from gateway.console import totp
from gateway.console.sessions import (
    Client,
    CodeNeeded,
    Refusal,
    SessionDesk,
    SignedIn,
    SignInRefused,
    delete_timed_out,
    session_id,
)
from gateway.login_throttle import LoginThrottle
from gateway.store.db import Database
from gateway.store.models import ConsoleSession, Event, Role

EMAIL = "anna@broker.example"
PASSWORD = "correct horse battery"
HERE = Client("192.0.2.10", "Firefox")
THERE = Client("198.51.100.7", "Safari")


class Clock:
    """A clock the test moves on. Against a running relay, start it at the real time: the
    relay's sweeper ends sessions by the real clock, so a fixed date in the past would let it
    end them mid-test once that date is more than a timeout ago."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 12, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_desk(db: Database, clock: Clock, **smtp: int) -> SessionDesk:
    throttle = LoginThrottle.from_settings(SmtpSettings(**smtp), clock.monotonic)  # type: ignore[arg-type]
    settings = ConsoleSettings(idle_timeout=1800, absolute_timeout=12 * 3600)
    return SessionDesk(db, settings, throttle, b"k" * 32, clock)


async def signed_in(desk: SessionDesk, client: Client = HERE, **kw: str) -> SignedIn:
    result = await desk.sign_in(EMAIL, PASSWORD, client, **kw)
    assert isinstance(result, SignedIn)
    return result


async def stored_sessions(db: Database) -> list[ConsoleSession]:
    async with db.transaction() as session:
        return list((await session.scalars(select(ConsoleSession))).all())


async def journal(db: Database) -> list[Event]:
    async with db.transaction() as session:
        return list((await session.scalars(select(Event).order_by(Event.id))).all())


async def test_a_sign_in_stores_only_the_tokens_hash_and_the_token_finds_the_user(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD, role=Role.TEAM_LEAD, group="Nord")
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    rows = await stored_sessions(database)
    assert [r.id for r in rows] == [hashlib.sha256(done.token.encode()).hexdigest()]
    assert done.token not in {r.id for r in rows}
    assert len(done.token) >= 43  # 256 bits, url-safe base64
    user = await desk.current(done.token)
    assert user is not None
    assert (user.email, user.role, user.group) == (EMAIL, Role.TEAM_LEAD, "Nord")
    assert user.principal().scope.group == "Nord"
    assert rows[0].ip == HERE.ip and rows[0].user_agent == "Firefox"
    assert await desk.current("not-a-token") is None
    assert await desk.current("") is None
    kinds = [e.type for e in await journal(database)]
    assert kinds[-1] == "console.signed_in"


async def test_the_login_is_case_blind_and_trimmed(database: Database, clock: Clock) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    result = await desk.sign_in("  Anna@Broker.EXAMPLE ", PASSWORD, HERE)
    assert isinstance(result, SignedIn)


@pytest.mark.parametrize(
    ("login", "password"),
    [(EMAIL, "wrong password!"), ("nobody@broker.example", PASSWORD), (EMAIL, "")],
)
async def test_wrong_password_and_unknown_user_get_the_same_answer_and_no_session(
    database: Database, clock: Clock, login: str, password: str
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    with pytest.raises(SignInRefused) as refused:
        await desk.sign_in(login, password, HERE)
    assert refused.value.refusal is Refusal.WRONG
    assert await stored_sessions(database) == []
    failed = [e for e in await journal(database) if e.type == "console.sign_in_failed"]
    assert [e.data for e in failed] == [{"login": login, "ip": HERE.ip, "reason": "password"}]
    assert all(PASSWORD not in str(e.data) for e in await journal(database))


async def test_a_disabled_user_cannot_sign_in_and_loses_open_sessions_at_once(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    first = await signed_in(desk)
    second = await signed_in(desk, THERE)
    await users.set_disabled(database, EMAIL)
    assert await desk.current(first.token) is None
    assert await desk.current(second.token) is None
    assert await stored_sessions(database) == []
    with pytest.raises(SignInRefused):
        await desk.sign_in(EMAIL, PASSWORD, HERE)
    await users.set_disabled(database, EMAIL, False)
    assert await desk.current(first.token) is None, "enabling again revives nothing"


async def test_the_lookup_itself_refuses_a_disabled_user(database: Database, clock: Clock) -> None:
    """Even a session row that outlived the disabling (another instance) signs no one in."""
    user = await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    async with database.transaction() as session:
        row = await session.get(type(user), user.id)
        assert row is not None
        row.disabled = True
    assert await desk.current(done.token) is None


async def test_each_sign_in_rotates_and_a_presented_token_is_deleted(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    planted = await signed_in(desk)  # say an attacker's own session, planted in a browser
    fresh = await signed_in(desk, replacing=planted.token)
    assert fresh.token != planted.token
    assert await desk.current(planted.token) is None
    assert await desk.current(fresh.token) is not None
    with pytest.raises(SignInRefused):
        await desk.sign_in(EMAIL, "wrong password!", HERE, replacing=fresh.token)
    assert await desk.current(fresh.token) is None, "a failed sign-in ends it too"


async def test_idle_timeout_and_activity_keeping_a_session_alive(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    for _ in range(5):  # 5 × 29 minutes, active each time
        clock.now += timedelta(minutes=29)
        assert await desk.current(done.token) is not None
    clock.now += timedelta(minutes=30)
    assert await desk.current(done.token) is None
    assert await stored_sessions(database) == [], "the timed-out session is deleted"


async def test_absolute_timeout_ends_even_an_active_session(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    start = clock.now
    while clock.now - start < timedelta(hours=12) - timedelta(minutes=20):
        clock.now += timedelta(minutes=20)
        assert await desk.current(done.token) is not None
    clock.now = start + timedelta(hours=12)
    assert await desk.current(done.token) is None


async def test_last_seen_is_written_at_most_once_a_minute(database: Database, clock: Clock) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    signed_at = clock.now
    clock.now += timedelta(seconds=59)
    await desk.current(done.token)
    assert [r.last_seen_at for r in await stored_sessions(database)] == [signed_at]
    clock.now += timedelta(seconds=1)
    await desk.current(done.token)
    assert [r.last_seen_at for r in await stored_sessions(database)] == [clock.now]


async def test_sign_out_and_sign_out_everywhere(database: Database, clock: Clock) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    await users.add_user(database, "ben@broker.example", PASSWORD)
    desk = make_desk(database, clock)
    here, there, third = [await signed_in(desk, c) for c in (HERE, THERE, HERE)]
    other = await desk.sign_in("ben@broker.example", PASSWORD, HERE)
    assert isinstance(other, SignedIn)
    user = await desk.current(here.token)
    assert user is not None
    assert await desk.open_sessions(user) == 3
    await desk.sign_out(user)
    assert await desk.current(here.token) is None
    assert await desk.current(there.token) is not None
    still = await desk.current(third.token)
    assert still is not None
    assert await desk.sign_out_everywhere(still) == 2
    assert await desk.current(there.token) is None
    assert await desk.current(third.token) is None
    assert await desk.current(other.token) is not None, "another user's session stays"
    events = [(e.type, e.data) for e in await journal(database)][-2:]
    assert events == [
        ("console.signed_out", {"email": EMAIL}),
        ("console.signed_out_everywhere", {"email": EMAIL, "sessions": 2}),
    ]


async def test_failures_are_throttled_per_address_and_per_account(
    database: Database, clock: Clock
) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock, max_auth_failures_per_ip=3, max_auth_failures_per_account=5)
    for _ in range(3):
        with pytest.raises(SignInRefused):
            await desk.sign_in(EMAIL, "wrong password!", HERE)
    with pytest.raises(SignInRefused) as refused:
        await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert refused.value.refusal is Refusal.THROTTLED, "even the right password waits"
    failed = [e for e in await journal(database) if e.type == "console.sign_in_failed"]
    assert len(failed) == 3, "throttled attempts are not journaled"
    # the account: failures spread over addresses
    for n in range(2):
        with pytest.raises(SignInRefused):
            await desk.sign_in(EMAIL, "wrong password!", Client(f"203.0.113.{n}", ""))
    with pytest.raises(SignInRefused) as refused:
        await desk.sign_in(EMAIL, PASSWORD, Client("203.0.113.99", ""))
    assert refused.value.refusal is Refusal.THROTTLED
    clock.now += timedelta(seconds=60)  # one failure leaks away
    await signed_in(desk, THERE)
    # where a login succeeded lately, the account's bucket does not lock the user out
    for n in range(6):
        with pytest.raises(SignInRefused):
            await desk.sign_in(EMAIL, "wrong password!", Client(f"203.0.114.{n}", ""))
    await signed_in(desk, THERE)


def wrong_code(secret: str, now: datetime) -> str:
    """Six digits that are none of the codes accepted at `now`."""
    accepted = {pyotp.TOTP(secret).at(now + timedelta(seconds=30 * n)) for n in (-1, 0, 1)}
    return next(c for c in ("000000", "123456", "999999", "424242") if c not in accepted)


async def _with_totp(database: Database) -> str:
    await users.add_user(database, EMAIL, PASSWORD, role=Role.ADMIN)
    setup = await totp.enable(database, EMAIL, "Makler Nord")
    assert setup.uri.startswith("otpauth://totp/Makler%20Nord:anna%40broker.example?secret=")
    return setup.secret


async def test_totp_right_code_signs_in_and_a_code_is_spent_once(
    database: Database, clock: Clock
) -> None:
    secret = await _with_totp(database)
    desk = make_desk(database, clock)
    step = await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(step, CodeNeeded)
    assert await stored_sessions(database) == [], "the password alone opens nothing"
    code = pyotp.TOTP(secret).at(clock.now)
    done = await desk.confirm_code(step.pending, code, HERE)
    assert await desk.current(done.token) is not None
    again = await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(again, CodeNeeded)
    with pytest.raises(SignInRefused) as refused:
        await desk.confirm_code(again.pending, code, HERE)
    assert refused.value.refusal is Refusal.WRONG, "the same code twice"
    clock.now += timedelta(seconds=30)
    await desk.confirm_code(again.pending, pyotp.TOTP(secret).at(clock.now), HERE)


async def test_a_spent_code_stays_spent_across_processes_restarts_and_a_race(
    database: Database, clock: Clock
) -> None:
    """Two relay processes (two desks on one database) each get the same code at the same
    moment: exactly one signs in. A desk started afterwards refuses it too."""
    secret = await _with_totp(database)
    desks = [make_desk(database, clock), make_desk(database, clock)]
    pending = []
    for desk in desks:
        step = await desk.sign_in(EMAIL, PASSWORD, HERE)
        assert isinstance(step, CodeNeeded)
        pending.append(step.pending)
    code = pyotp.TOTP(secret).at(clock.now)
    results = await asyncio.gather(
        *(desk.confirm_code(p, code, HERE) for desk, p in zip(desks, pending, strict=True)),
        return_exceptions=True,
    )
    signed = [r for r in results if isinstance(r, SignedIn)]
    refused = [r for r in results if isinstance(r, SignInRefused)]
    assert len(signed) == 1 and len(refused) == 1, results
    assert refused[0].refusal is Refusal.WRONG
    assert len(await stored_sessions(database)) == 1

    restarted = make_desk(database, clock)
    step = await restarted.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(step, CodeNeeded)
    with pytest.raises(SignInRefused):
        await restarted.confirm_code(step.pending, code, HERE)
    # the step before the spent one is refused as well; the next one signs in
    with pytest.raises(SignInRefused):
        await restarted.confirm_code(
            step.pending, pyotp.TOTP(secret).at(clock.now - timedelta(seconds=30)), HERE
        )
    clock.now += timedelta(seconds=30)
    done = await restarted.confirm_code(step.pending, pyotp.TOTP(secret).at(clock.now), HERE)
    assert await restarted.current(done.token) is not None


@pytest.mark.parametrize("code", ["", "000000", "12345", "abcdef", "1234567"])
async def test_totp_wrong_or_missing_code_is_a_failure(
    database: Database, clock: Clock, code: str
) -> None:
    secret = await _with_totp(database)
    if code == "000000":
        code = wrong_code(secret, clock.now)
    desk = make_desk(database, clock, max_auth_failures_per_ip=2)
    step = await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(step, CodeNeeded)
    with pytest.raises(SignInRefused) as refused:
        await desk.confirm_code(step.pending, code, HERE)
    assert refused.value.refusal is Refusal.WRONG
    assert await stored_sessions(database) == []
    failed = [e.data for e in await journal(database) if e.type == "console.sign_in_failed"]
    assert failed == [{"login": EMAIL, "ip": HERE.ip, "reason": "code"}]
    with pytest.raises(SignInRefused):
        await desk.confirm_code(step.pending, wrong_code(secret, clock.now), HERE)
    with pytest.raises(SignInRefused) as refused:
        await desk.confirm_code(step.pending, pyotp.TOTP(secret).at(clock.now), HERE)
    assert refused.value.refusal is Refusal.THROTTLED, "wrong codes count as failed logins"


async def test_the_pending_step_cannot_be_forged_reused_late_or_after_changes(
    database: Database, clock: Clock
) -> None:
    secret = await _with_totp(database)
    desk = make_desk(database, clock)
    step = await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(step, CodeNeeded)
    user_id, expires, nonce, mac = step.pending.split(".")
    forged = [
        f"{user_id}.{int(expires) + 3600}.{nonce}.{mac}",
        f"{int(user_id) + 1}.{expires}.{nonce}.{mac}",
        f"{user_id}.{expires}.{nonce}.{mac[:-2]}{'BB' if mac.endswith('AA') else 'AA'}",
        "1.2.3",
        "",
        "x.y.z.w",
    ]
    for pending in forged:
        with pytest.raises(SignInRefused) as refused:
            await desk.confirm_code(pending, pyotp.TOTP(secret).at(clock.now), HERE)
        assert refused.value.refusal is Refusal.EXPIRED, pending
    clock.now += timedelta(minutes=5, seconds=1)
    with pytest.raises(SignInRefused) as refused:
        await desk.confirm_code(step.pending, pyotp.TOTP(secret).at(clock.now), HERE)
    assert refused.value.refusal is Refusal.EXPIRED
    fresh = await desk.sign_in(EMAIL, PASSWORD, HERE)
    assert isinstance(fresh, CodeNeeded)
    await users.set_password(database, EMAIL, "another good password")
    with pytest.raises(SignInRefused) as refused:
        await desk.confirm_code(fresh.pending, pyotp.TOTP(secret).at(clock.now), HERE)
    assert refused.value.refusal is Refusal.EXPIRED, "a password change voids the step"
    assert await stored_sessions(database) == []


async def test_totp_off_signs_in_with_the_password_alone(database: Database, clock: Clock) -> None:
    await _with_totp(database)
    await totp.disable(database, EMAIL)
    desk = make_desk(database, clock)
    await signed_in(desk)
    kinds = [e.type for e in await journal(database)]
    assert "user.totp_enabled" in kinds and "user.totp_disabled" in kinds


async def test_a_deleted_user_is_signed_out_with_their_sessions_gone(
    database: Database, clock: Clock
) -> None:
    user = await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    done = await signed_in(desk)
    async with database.transaction() as session:
        row = await session.get(type(user), user.id)
        await session.delete(row)
    assert await desk.current(done.token) is None
    assert await stored_sessions(database) == []


async def test_the_sweep_deletes_timed_out_sessions_only(database: Database, clock: Clock) -> None:
    await users.add_user(database, EMAIL, PASSWORD)
    desk = make_desk(database, clock)
    idle = await signed_in(desk)
    clock.now += timedelta(minutes=20)
    active = await signed_in(desk, THERE)
    clock.now += timedelta(minutes=15)  # idle: 35 minutes quiet; active: 15
    settings = ConsoleSettings(idle_timeout=1800, absolute_timeout=12 * 3600)
    assert await delete_timed_out(database, settings, clock.now) == 1
    assert [r.id for r in await stored_sessions(database)] == [session_id(active.token)]
    assert await desk.current(idle.token) is None
