"""The SMTP front under slow clients and floods, through real sockets.

A slow but steady client must get its 250; a silent one a 421. Floods of connections and of
failed logins are refused early, per client address, so that an agent from another address
is neither locked out nor slowed. Clients take their own source address from 127.0.0.0/8
(Linux routes the whole block to loopback), which is how one test plays several hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from argon2 import PasswordHasher
from sqlalchemy import update

from gateway import users
from gateway.fronts.smtp_guard import ACCEPT_FAILURES, FailedLogins, ThrottledLog, ThrottledRecords
from gateway.login_throttle import LoginThrottle
from gateway.store.models import User
from tests.cli_runner import SEALRELAY
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay
from tests.fronts.test_smtp_front import (
    PROSPECT,
    TIMEOUT,
    Answer,
    Wire,
    assert_nothing_written,
    client_tls,
    dotted,
    plain_token,
    raw_message,
    send_sentinel,
)
from tests.support import free_port, serve_config, wait_for_port

AGENT_IP = "127.0.0.1"


async def connect(port: int, source: str) -> Wire:
    """A raw connection from `source`, greeting not yet read."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
    )
    return Wire(reader, writer)


async def greeted(port: int, source: str) -> Wire:
    wire = await connect(port, source)
    greeting = await wire.answer()
    assert greeting.code == 220, greeting
    return wire


async def logged_in(relay: Harness, source: str = AGENT_IP) -> Wire:
    wire = await greeted(relay.smtp_port, source)
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    answer = await wire.command(f"AUTH PLAIN {plain_token()}")
    assert answer.code == 235, answer
    return wire


async def started_tls(relay: Harness, source: str) -> Wire:
    wire = await greeted(relay.smtp_port, source)
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    return wire


@contextlib.asynccontextmanager
async def wires() -> AsyncIterator[list[Wire]]:
    """Connections that are all closed at the end, however the test ends."""
    opened: list[Wire] = []
    try:
        yield opened
    finally:
        await asyncio.gather(*(w.close() for w in opened), return_exceptions=True)


async def refused_at_greeting(port: int, source: str) -> Answer:
    """The reply a connection gets instead of 220; the server must close it after."""
    wire = await connect(port, source)
    try:
        answer = await wire.answer()
        assert await wire.closed_by_server()
        return answer
    finally:
        await wire.close()


# -- item 12: the timeout is client silence, not the length of a transfer


async def test_slow_steady_data_longer_than_the_timeout_gets_250(
    relay_factory: StartRelay,
) -> None:
    timeout = 2.0
    relay = await relay_factory(smtp={"timeout": timeout})
    wire = await logged_in(relay)
    try:
        assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
        assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
        assert (await wire.command("DATA")).code == 354
        body = b"".join(b"line %03d of a slow upload\r\n" % n for n in range(20))
        payload = dotted(raw_message(body=body))
        pieces = [payload[i : i + 40] for i in range(0, len(payload), 40)]
        # a piece every 0.4 s: never silent for long, but the whole transfer takes ~7 s
        pace = timeout / 5
        assert pace * len(pieces) > 3 * timeout
        for piece in pieces:
            await wire.write(piece)
            await asyncio.sleep(pace)
        answer = await wire.answer()
        assert answer.code == 250 and "queued as" in answer.text, answer
        [copy] = await relay.sink.expect(1)
        assert b"line 019 of a slow upload" in copy.data
    finally:
        await wire.close()


async def test_commands_that_keep_coming_keep_the_session_past_the_timeout(
    relay_factory: StartRelay,
) -> None:
    """The idle timer set at the first command fires while later ones have moved the
    deadline on: it must wait the rest, not close (gateway/fronts/smtp.py _reset_timeout)."""
    timeout = 1.0
    relay = await relay_factory(smtp={"timeout": timeout})
    wire = await logged_in(relay)
    try:
        pace = timeout * 0.3
        for _ in range(10):  # three timeouts long in all
            await asyncio.sleep(pace)
            assert (await wire.command("NOOP")).code == 250
        await send_sentinel(relay, wire)
        # and silence still ends it, one timeout after the last command
        answer = await wire.answer()
        assert answer.lines[0].startswith("421 4.4.2 "), answer
        assert await wire.closed_by_server()
    finally:
        await wire.close()


def a_hash_checked_in_more_than(seconds: float) -> str:
    """An argon2 hash of PASSWORD whose check takes longer than `seconds` on this machine,
    however fast it is: passes over 64 MiB, doubled until one check is slow enough."""
    for time_cost in (4, 8, 16, 32, 64, 128):
        hasher = PasswordHasher(time_cost=time_cost, memory_cost=64 * 1024, parallelism=1)
        hashed = hasher.hash(PASSWORD)
        began = time.perf_counter()
        hasher.verify(hashed, PASSWORD)
        if time.perf_counter() - began > seconds:
            return hashed
    raise AssertionError(f"no argon2 check here took over {seconds} s")


async def test_a_login_checked_longer_than_the_timeout_is_not_closed_as_silent(
    relay_factory: StartRelay,
) -> None:
    """The client waits for the relay while its password is checked (on a busy relay, in a
    queue of others): the idle timer rests then, and the session hears 235, not 421."""
    timeout = 0.3
    relay = await relay_factory(smtp={"timeout": timeout})
    slow = await asyncio.to_thread(a_hash_checked_in_more_than, 4 * timeout)
    async with relay.relay.db.transaction() as session:
        await session.execute(update(User).where(User.email == AGENT).values(password_hash=slow))
    wire = await started_tls(relay, AGENT_IP)
    try:
        started = asyncio.get_running_loop().time()
        answer = await wire.command(f"AUTH PLAIN {plain_token()}")
        took = asyncio.get_running_loop().time() - started
        assert took > 2 * timeout, f"the check took {took:.2f} s: not longer than the timeout"
        assert answer.code == 235, answer
        # the client's turn again: the timer runs, and silence still ends the session
        answer = await wire.answer()
        assert answer.lines[0].startswith("421 4.4.2 "), answer
        assert await wire.closed_by_server()
    finally:
        await wire.close()


async def test_a_client_silent_after_an_auth_challenge_gets_421(
    relay_factory: StartRelay,
) -> None:
    """While the relay waits for the answer to 334, it is the client's turn."""
    relay = await relay_factory(smtp={"timeout": 1.0})
    wire = await started_tls(relay, AGENT_IP)
    try:
        assert (await wire.command("AUTH LOGIN")).code == 334
        answer = await wire.answer()  # bounded by TIMEOUT; the relay must speak first
        assert answer.lines[0].startswith("421 4.4.2 "), answer
        assert await wire.closed_by_server()
    finally:
        await wire.close()


@pytest.mark.parametrize("phase", ["during-data", "between-commands"])
async def test_a_silent_client_gets_421_timeout_and_nothing_is_stored(
    relay_factory: StartRelay, phase: str
) -> None:
    relay = await relay_factory(smtp={"timeout": 1.0})
    wire = await logged_in(relay)
    try:
        if phase == "during-data":
            assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
            assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
            assert (await wire.command("DATA")).code == 354
            await wire.write(raw_message()[:30])
        answer = await wire.answer()  # bounded by TIMEOUT; the relay must speak first
        assert answer.code == 421, answer
        assert answer.lines[0].startswith("421 4.4.2 "), answer
        assert "timeout" in answer.text.lower()
        assert await wire.closed_by_server()
    finally:
        await wire.close()
    await assert_nothing_written(relay)


# -- item 13: floods of connections and of failed logins


async def admitted_eventually(port: int, source: str) -> Wire:
    """A connection from `source` once the relay has counted a closed one out (bounded)."""
    for _ in range(100):
        wire = await connect(port, source)
        answer = await wire.answer()
        if answer.code == 220:
            return wire
        await wire.close()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{source} was never admitted again")


def log_lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


async def test_connections_over_the_per_address_limit_get_421_and_others_get_in(
    relay_factory: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await relay_factory(smtp={"max_connections_per_ip": 3})
    flood = "127.0.0.9"
    async with wires() as opened:
        for _ in range(3):
            opened.append(await greeted(relay.smtp_port, flood))
        for _ in range(10):
            answer = await refused_at_greeting(relay.smtp_port, flood)
            assert answer.lines == [
                "421 4.7.0 Too many connections from your address; try again later"
            ]
        # the implicit-TLS port counts the same sessions
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", relay.tls_port, ssl=client_tls(), local_addr=(flood, 0)
            ),
            TIMEOUT,
        )
        tls_wire = Wire(reader, writer)
        opened.append(tls_wire)
        assert (await tls_wire.answer()).code == 421

        # an agent from elsewhere is not locked out
        agent = await logged_in(relay, AGENT_IP)
        opened.append(agent)
        await send_sentinel(relay, agent)

        # eleven refusals, one line in the log
        assert len(log_lines(caplog, "refused a connection from 127.0.0.9")) == 1

        # a closed session frees its place
        assert (await opened[0].command("QUIT")).code == 221
        opened.append(await admitted_eventually(relay.smtp_port, flood))


async def test_connections_over_the_total_limit_get_421_busy(relay_factory: StartRelay) -> None:
    relay = await relay_factory(smtp={"max_connections": 4})
    async with wires() as opened:
        for n in range(4):
            opened.append(await greeted(relay.smtp_port, f"127.0.3.{n + 1}"))
        answer = await refused_at_greeting(relay.smtp_port, "127.0.3.99")
        assert answer.lines == ["421 4.3.2 Too many connections; try again later"]
        assert (await opened.pop(0).command("QUIT")).code == 221
        agent = await admitted_eventually(relay.smtp_port, AGENT_IP)
        opened.append(agent)
        await agent.ehlo()
        await agent.starttls()
        await agent.ehlo()
        assert (await agent.command(f"AUTH PLAIN {plain_token()}")).code == 235
        await send_sentinel(relay, agent)


async def test_failed_logins_are_counted_per_address_across_connections(
    relay_factory: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await relay_factory(smtp={"max_auth_failures_per_ip": 4, "auth_failure_forget": 3600})
    attacker = "127.0.0.7"
    bad = plain_token(password="guess 1")

    first = await started_tls(relay, attacker)
    try:
        for _ in range(2):
            assert (await first.command(f"AUTH PLAIN {bad}")).code == 535
        assert (await first.command(f"AUTH PLAIN {bad}")).code == 421  # per connection: 3
        assert await first.closed_by_server()
    finally:
        await first.close()

    second = await started_tls(relay, attacker)
    try:
        assert (await second.command(f"AUTH PLAIN {bad}")).code == 535  # the fourth
        # over budget: refused before any password is checked, the right one included
        answer = await second.command(f"AUTH PLAIN {plain_token()}")
        assert answer.lines == [
            "454 4.7.0 Too many failed logins from your address; try again later"
        ]
        # and such refusals count for the connection's own limit
        assert (await second.command("AUTH LOGIN")).code == 421
        assert await second.closed_by_server()
    finally:
        await second.close()

    answer = await refused_at_greeting(relay.smtp_port, attacker)
    assert answer.lines == ["421 4.7.0 Too many failed logins from your address; try again later"]

    # the agent's own address has a clean record
    agent = await logged_in(relay, AGENT_IP)
    try:
        await send_sentinel(relay, agent)
    finally:
        await agent.close()
    assert len(log_lines(caplog, "refused a login from 127.0.0.7")) == 1


async def test_parallel_guesses_from_one_address_get_no_more_checks_than_the_budget(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(smtp={"max_auth_failures_per_ip": 3, "auth_failure_forget": 3600})
    attacker = "127.0.0.8"
    async with wires() as opened:
        for _ in range(8):
            opened.append(await started_tls(relay, attacker))
        for n, wire in enumerate(opened):
            await wire.write(f"AUTH PLAIN {plain_token(password=f'guess {n}')}\r\n".encode())
        answers = await asyncio.gather(*(wire.answer() for wire in opened))
    assert sorted(a.code for a in answers) == [454] * 5 + [535] * 3, answers


async def test_parallel_logins_with_the_right_password_wait_their_turn_instead_of_refusal(
    relay_factory: StartRelay,
) -> None:
    """A CRM opening many sessions at once for one account, from an address never seen: more
    logins are under way than the account's and the address's budgets, and none failed."""
    relay = await relay_factory(
        smtp={"max_auth_failures_per_ip": 4, "max_auth_failures_per_account": 3}
    )
    async with wires() as opened:
        for _ in range(12):
            opened.append(await started_tls(relay, "127.0.0.9"))
        for wire in opened:
            await wire.write(f"AUTH PLAIN {plain_token()}\r\n".encode())
        answers = await asyncio.gather(*(wire.answer() for wire in opened))
    assert [a.code for a in answers] == [235] * 12, answers


async def waiting_checks(web_url: str, http: aiohttp.ClientSession) -> float:
    async with http.get(f"{web_url}/metrics") as response:
        body = await response.text()
    match = re.search(r"^sealrelay_auth_checks_waiting (\S+)$", body, re.MULTILINE)
    assert match is not None, "the metric sealrelay_auth_checks_waiting is missing"
    return float(match.group(1))


async def test_a_login_from_a_clean_address_goes_ahead_of_queued_guesses(
    relay_factory: StartRelay,
) -> None:
    """Completion order, not time: with guesses queued, the agent's check comes next.

    Both hasher threads are held busy until every guess and the agent's login are queued,
    so the queue's order alone decides who is answered first.
    """
    # 32 guesses at the agent's account: its own budget would refuse the agent before any
    # queue (tests/console/test_console_pages.py covers that); here only the order counts
    relay = await relay_factory(
        smtp={"auth_failure_forget": 3600, "max_auth_failures_per_account": 100}
    )
    guessers = [f"127.0.4.{n}" for n in range(1, 17)]
    bad = plain_token(password="a guess")
    finished: list[str] = []

    async def answered(wire: Wire, name: str, code: int) -> None:
        answer = await wire.answer()
        assert answer.code == code, answer
        finished.append(name)

    async def queued(http: aiohttp.ClientSession, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while await waiting_checks(relay.web_url, http) < count:
                await asyncio.sleep(0.02)

    release = threading.Event()
    async with wires() as opened, aiohttp.ClientSession() as http:
        # each guesser address has failed once before: its record is no longer clean
        for address in guessers:
            wire = await started_tls(relay, address)
            opened.append(wire)
            assert (await wire.command(f"AUTH PLAIN {bad}")).code == 535
        agent = await started_tls(relay, AGENT_IP)

        busy = [users._argon2_pool.submit(release.wait) for _ in range(users.ARGON2_THREADS)]
        try:
            replies = []
            for wire, address in zip(opened, guessers, strict=True):
                await wire.write(f"AUTH PLAIN {bad}\r\n".encode())
                replies.append(asyncio.create_task(answered(wire, address, 535)))
            # two guesses hold the hasher's turns, the others wait in the queue
            await queued(http, len(guessers) - users.ARGON2_THREADS)
            await agent.write(f"AUTH PLAIN {plain_token()}\r\n".encode())
            replies.append(asyncio.create_task(answered(agent, "agent", 235)))
            await queued(http, len(guessers) - users.ARGON2_THREADS + 1)
        finally:
            release.set()
        await asyncio.gather(*replies, *(asyncio.wrap_future(f) for f in busy))
        await agent.close()
    # before it finish the checks that held a turn, and those that ran beside its own;
    # first come, first served it would be the last of all 17
    assert finished.index("agent") <= 2 * users.ARGON2_THREADS, finished


async def test_idle_sessions_from_many_addresses_are_shed_so_an_agent_gets_in(
    relay_factory: StartRelay,
) -> None:
    """Three quarters full, a session not logged in may stay silent only busy_timeout."""
    relay = await relay_factory(smtp={"max_connections": 8, "busy_timeout": 0.5, "timeout": 300})
    async with wires() as opened:
        for n in range(8):
            opened.append(await greeted(relay.smtp_port, f"127.0.6.{n + 1}"))
        # the flood's sessions are closed after half a second of silence, not 300 s
        for wire in opened:
            answer = await wire.answer()
            assert answer.lines[0].startswith("421 4.4.2 "), answer
            assert await wire.closed_by_server()
        agent = await admitted_eventually(relay.smtp_port, AGENT_IP)
        opened.append(agent)
        await agent.ehlo()
        await agent.starttls()
        await agent.ehlo()
        assert (await agent.command(f"AUTH PLAIN {plain_token()}")).code == 235
        await send_sentinel(relay, agent)


# -- the whole process against the file-descriptor limit


def relay_config(tmp_path: Path, smtp_port: int) -> Path:
    return serve_config(
        tmp_path,
        smtp_port=smtp_port,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
        extra={"smtp": "busy_timeout = 120"},
    )


def low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


FD_LIMIT = 256


@pytest.mark.slow
async def test_a_flood_past_the_descriptor_limit_is_refused_not_a_lockout(
    tmp_path: Path,
) -> None:
    """1,050 idle connections used to exhaust the descriptors: then nobody got in and
    asyncio logged `accept() out of system resource` without pause. Scaled down here."""
    smtp_port = free_port()
    config = relay_config(tmp_path, smtp_port)
    add = await asyncio.create_subprocess_exec(
        SEALRELAY,
        *("user", "add", AGENT, "--password-stdin", "--config", str(config)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    await add.communicate(f"{PASSWORD}\n".encode())
    assert add.returncode == 0
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *(SEALRELAY, "serve", "--config", str(config)),
            stdout=log,
            stderr=log,
            preexec_fn=low_descriptor_limit,
        )
        try:
            await wait_for_port(smtp_port, process)
            greetings: Counter[str] = Counter()
            async with wires() as opened:
                for n in range(FD_LIMIT):
                    wire = await connect(smtp_port, f"127.0.7.{n // 40 + 1}")
                    answer = await wire.answer()
                    greetings[answer.lines[0][:9]] += 1
                    if answer.code == 220:
                        opened.append(wire)
                    else:
                        await wire.close()
                admitted = greetings["220 relay"]
                assert 0 < admitted < FD_LIMIT - 32, greetings
                assert greetings["421 4.3.2"] == FD_LIMIT - admitted, greetings
            # the flood is gone: the agent gets in
            agent = await admitted_eventually(smtp_port, AGENT_IP)
            try:
                await agent.ehlo()
                assert (await agent.command(f"AUTH PLAIN {plain_token()}")).code == 235
            finally:
                await agent.close()
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await process.wait()
    assert code == 0
    text = log_path.read_text()
    assert "out of system resource" not in text
    assert f"smtp.max_connections 1000 lowered to {admitted}" in text
    assert len(re.findall(r"refused a connection from .*sessions open", text)) == 1, text


# -- the mechanisms on their own, with a clock the test moves


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_logins_leak_away_one_per_forget_interval() -> None:
    clock = Clock()
    failed = FailedLogins(budget=3, forget_seconds=60, clock=clock)
    for _ in range(3):
        failed.record("192.0.2.1")
    assert failed.over_budget("192.0.2.1")
    assert not failed.over_budget("192.0.2.2")
    clock.now += 59
    assert failed.over_budget("192.0.2.1")
    clock.now += 1
    assert not failed.over_budget("192.0.2.1")
    assert failed.level("192.0.2.1") == pytest.approx(2)
    clock.now += 3600
    assert failed.level("192.0.2.1") == 0


async def test_a_login_waits_for_the_checks_that_fill_its_budget_and_no_longer() -> None:
    clock = Clock()
    throttle = LoginThrottle(
        FailedLogins(budget=1, forget_seconds=60, clock=clock),
        FailedLogins(budget=5, forget_seconds=60, clock=clock),
    )
    with throttle.checking("192.0.2.1", "agent@broker.example"):
        with pytest.raises(TimeoutError):
            await throttle.wait_turn("192.0.2.1", "agent@broker.example", limit=0.05)
        waiting = asyncio.create_task(throttle.wait_turn("192.0.2.1", "agent@broker.example"))
        await asyncio.sleep(0)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 5)  # woken when the check before it ended

    throttle.failed("192.0.2.1", "agent@broker.example")
    assert throttle.refused("192.0.2.1", "agent@broker.example")
    # over budget by failures: no waiting, the caller refuses at once
    await asyncio.wait_for(throttle.wait_turn("192.0.2.1", "agent@broker.example"), 5)


def test_addresses_agents_logged_in_from_go_first_to_the_check() -> None:
    clock = Clock()
    failed = FailedLogins(budget=20, forget_seconds=60, clock=clock)
    failed.record("192.0.2.9")
    failed.record_login("192.0.2.1")
    order = sorted(["192.0.2.9", "192.0.2.5", "192.0.2.1"], key=failed.priority)
    assert order == ["192.0.2.1", "192.0.2.5", "192.0.2.9"]
    clock.now += FailedLogins.TRUST_SECONDS
    assert failed.priority("192.0.2.1") == failed.priority("192.0.2.5") == 0


def test_throttled_log_writes_one_line_per_kind_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("test.throttled"), interval=60, clock=clock)
    for n in range(100):
        throttled.warning("flood", "refused %d", n)
    throttled.warning("other", "another kind")
    clock.now += 60
    throttled.warning("flood", "refused %d", 100)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "another kind",
        "refused 100 (and 99 more like it in the last 60 s)",
    ]


def test_asyncios_accept_failures_are_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    records = ThrottledRecords("socket.accept() out of system resource", 60, clock)
    logger = logging.getLogger("test.accept")
    logger.addFilter(records)
    try:
        for _ in range(500):
            logger.error("socket.accept() out of system resource")
        logger.error("something else")
        clock.now += 61
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeFilter(records)
    assert [r.getMessage() for r in caplog.records] == [
        "socket.accept() out of system resource",
        "something else",
        "socket.accept() out of system resource (and 499 more like it in the last 60 s)",
    ]
    assert ACCEPT_FAILURES in logging.getLogger("asyncio").filters
