"""`sealrelay serve --processes 2` on SQLite and PostgreSQL: two processes take mail and
serve the web at once, and the work is still done once.

The relay runs as the real command. Which process a connection reached is read from the
kernel (psutil: the child that holds the server end of the client's port), so the test talks
to each process on purpose instead of hoping that SO_REUSEPORT spread the connections.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import aiosmtplib
import psutil
import pytest
from sqlalchemy import func, select

from gateway.store.db import Database
from gateway.store.models import Consent, Event
from gateway.store.sweeper import SweepReport
from sealrelay.processes import delivery_share
from sealrelay.serve import Relay
from tests.cli_runner import sealrelay
from tests.conftest import AGENT, PASSWORD, relay_settings
from tests.letter_site import BIG_PDF, PROSPECT, REQUIRED, offer, token_in
from tests.store.test_durability import RelayProcess, burst_message, message_ids
from tests.support import PERSON_UA, Sink, free_port, serve_config

pytestmark = pytest.mark.slow

PER_PROCESS = 15
TIMEOUT = 30.0


def children(relay: RelayProcess) -> set[int]:
    assert relay.process is not None
    return {child.pid for child in psutil.Process(relay.process.pid).children()}


def owner(local_port: int, pids: set[int]) -> int:
    """The child holding the server end of the connection from `local_port`."""
    for pid in pids:
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.raddr and connection.raddr.port == local_port:
                return pid
    raise AssertionError(f"no child holds the connection from port {local_port}")


async def smtp_to(relay: RelayProcess, pid: int) -> aiosmtplib.SMTP:
    """A logged-in SMTP session that process `pid` took (new connections until one is)."""
    for _ in range(40):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.smtp_port, start_tls=False, timeout=15
        )
        await client.connect()
        assert client.transport is not None
        if owner(client.transport.get_extra_info("sockname")[1], children(relay)) == pid:
            await client.login(AGENT, PASSWORD)
            return client
        client.close()
    raise AssertionError(f"40 connections and none reached process {pid}")


async def web_to(relay: RelayProcess, pid: int) -> aiohttp.ClientSession:
    """A browser whose one kept-alive connection process `pid` took."""
    for _ in range(40):
        http = aiohttp.ClientSession(
            headers={"User-Agent": PERSON_UA},
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
        )
        before = _ports_to(relay.web_port)
        async with http.get(f"http://127.0.0.1:{relay.web_port}/healthz") as response:
            assert response.status == 200
            await response.read()
        [port] = _ports_to(relay.web_port) - before  # the session's kept-alive connection
        if owner(port, children(relay)) == pid:
            return http
        await http.close()
    raise AssertionError(f"40 connections and none reached process {pid}")


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition of another process tree (nothing there to await), bounded."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.05)


@pytest.fixture
async def two_processes(
    database_url: str, tmp_path: Path, sink: Sink, dkim_key_file: Path
) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(
        tmp_path,
        database_url,
        sink.port,
        serve_args=("--processes", "2"),
        # Long enough that a process starved of CPU on a busy machine keeps its claims: with
        # a 2 s lease the other process takes them over and sends them again (at least once).
        lease_seconds=30,
        extra_config=f"""
[dkim."broker.example"]
selector = "s2026"
key_file = "{dkim_key_file}"
""",
    )
    relay.write_config()
    await relay.add_agent()
    try:
        yield relay
    finally:
        await relay.stop()


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_two_processes_share_mail_letters_and_downloads(
    two_processes: RelayProcess, sink: Sink
) -> None:
    relay = two_processes
    await relay.start()
    pids = children(relay)
    assert len(pids) == 2
    first, second = sorted(pids)
    # the delivery limits are the relay's, shared between its processes
    assert "each of 2 processes sends at most 10 groups at once, 5 to one destination" in (
        relay.log_tail(200)
    )

    # both take mail, at the same time; every message is delivered once
    sessions = {pid: await smtp_to(relay, pid) for pid in (first, second)}
    wanted: set[str] = set()

    async def send(pid: int) -> None:
        for number in range(PER_PROCESS):
            message_id, message = burst_message(f"p{pid}", number)
            errors, reply = await sessions[pid].send_message(message)
            assert not errors and reply.startswith("2.0.0"), reply
            wanted.add(message_id)

    await asyncio.gather(send(first), send(second))
    await sink.expect(2 * PER_PROCESS)
    letter_sent = await sessions[first].sendmail(AGENT, [PROSPECT], offer())
    assert letter_sent[1].startswith("2.0.0")
    for client in sessions.values():
        await client.quit()
    arrived = await sink.expect(2 * PER_PROCESS + 1)
    assert set(message_ids(sink)) >= wanted
    assert all(n == 1 for mid, n in message_ids(sink).items() if mid in wanted)

    # a registered letter: consent given through both processes at once is recorded once
    [letter] = [m for m in arrived if m.rcpt_tos == [PROSPECT]]
    token = token_in(letter.data, f"http://127.0.0.1:{relay.web_port}")
    browsers = {pid: await web_to(relay, pid) for pid in (first, second)}
    try:
        page = f"http://127.0.0.1:{relay.web_port}/l/{token}"
        async with browsers[first].get(page) as response:
            found = re.search(r'name="csrf" value="([0-9a-f]{64})"', await response.text())
        assert found is not None
        fields = {"csrf": found.group(1), **dict.fromkeys(REQUIRED, "yes")}

        async def consent(pid: int) -> int:
            async with browsers[pid].post(page, data=fields, allow_redirects=False) as answer:
                await answer.read()
                return answer.status

        assert list(await asyncio.gather(consent(first), consent(second))) == [303, 303]
        database = Database.connect(relay.database_url)
        try:
            async with database.transaction() as session:
                assert await session.scalar(select(func.count()).select_from(Consent)) == 1
                given = select(func.count()).where(Event.type == "consent.given")
                assert await session.scalar(given.select_from(Event)) == 1
        finally:
            await database.close()
        # the released copy to the prospect and the confirmation to the agent, once each
        await sink.expect(2 * PER_PROCESS + 3)
        to = Counter(tuple(m.rcpt_tos) for m in sink.messages)
        assert to[(PROSPECT,)] == 2 and to[(AGENT,)] == 1

        # the offer's big file, a download link in the released copy, is served by either
        [released] = [m for m in sink.messages if m.rcpt_tos == [PROSPECT] and m is not letter]
        # read from the text body: the attachments' base64 may hold "/d/" and 43 letters too
        files_url = re.escape(f"http://127.0.0.1:{relay.web_port}/d/")
        text = email.message_from_bytes(released.data, policy=email.policy.default)
        body = text.get_body(("plain",))
        assert body is not None
        [link] = set(re.findall(rf"{files_url}([A-Za-z0-9_-]{{43}})", body.get_content()))
        files = f"http://127.0.0.1:{relay.web_port}/d/{link}"
        async with browsers[second].get(files) as response:
            found_files = set(re.findall(r'/f/([A-Za-z0-9_-]+)"', await response.text()))

        async def download(pid: int, file: str) -> bytes:
            async with browsers[pid].get(f"{files}/f/{file}") as response:
                assert response.status == 200, await response.text()
                return await response.read()

        contents = {file: await download(first, file) for file in found_files}
        [big] = [file for file, content in contents.items() if content == BIG_PDF]
        assert await download(second, big) == BIG_PDF
    finally:
        for http in browsers.values():
            await http.close()

    # a child killed is replaced, and the new one takes mail
    survivor = psutil.Process(first)
    psutil.Process(second).send_signal(signal.SIGKILL)
    await until(lambda: len(children(relay) - {first, second}) == 1)
    [replacement] = children(relay) - {first}
    replaced = psutil.Process(replacement)
    await until(lambda: _listens(replacement, relay.smtp_port))
    client = await smtp_to(relay, replacement)
    message_id, message = burst_message("replacement", 0)
    await client.send_message(message)
    await client.quit()
    async with asyncio.timeout(TIMEOUT):  # the agent's first-download notice may come too
        while message_id not in message_ids(sink):
            await sink.expect(len(sink.messages) + 1)
    assert message_ids(sink)[message_id] == 1

    # SIGTERM: every process stops, the supervisor exits 0
    assert relay.process is not None
    relay.process.send_signal(signal.SIGTERM)
    assert await relay.wait_exit(30) == 0, relay.log_tail()
    assert not survivor.is_running() and not replaced.is_running()  # pids may be reused
    log = relay.log_tail(400)
    assert f"[{first}]" in log and f"[{replacement}]" in log  # lines carry the pid
    assert re.search(r"process [01] was killed by SIGKILL; restarting it", log), log
    assert "all processes stopped" in log

    # both processes' events, numbered by both sequencers, make one unbroken chain
    checked = await sealrelay("verify", "--journal", "--config", str(relay.config))
    assert checked.code == 0, checked.out + checked.err
    assert re.search(r"journal OK: \d+ events, chain intact", checked.out), checked.out
    assert "not chained yet" not in checked.out


def _ports_to(port: int) -> set[int]:
    """This process's local ports of its open connections to `port`."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def _listens(pid: int, port: int) -> bool:
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


@pytest.mark.parametrize(
    ("configured", "count", "share"),
    [
        ((20, 10), 1, (20, 10)),
        ((20, 10), 2, (10, 5)),
        ((20, 10), 3, (6, 3)),
        ((4, 4), 8, (1, 1)),
    ],
)
def test_each_process_takes_its_share_of_the_delivery_limits(
    tmp_path: Path,
    configured: tuple[int, int],
    count: int,
    share: tuple[int, int],
) -> None:
    """A destination sees the relay, not its processes: N processes together keep to the
    configured limits (rounded down, at least 1 each), and nothing else changes."""
    base = relay_settings(tmp_path, 25)
    worker = base.worker.model_copy(
        update={"concurrency": configured[0], "destination_concurrency": configured[1]}
    )
    settings = base.model_copy(update={"worker": worker})
    shared = delivery_share(settings, count)
    assert (shared.worker.concurrency, shared.worker.destination_concurrency) == share
    assert shared.worker.lease_seconds == settings.worker.lease_seconds
    assert shared.smtp == settings.smtp
    assert (settings.worker.concurrency, settings.worker.destination_concurrency) == configured


async def test_an_in_memory_database_is_refused(tmp_path: Path) -> None:
    """It would lose the queue at every restart, and each process would have its own."""
    config = serve_config(
        tmp_path, smtp_port=free_port(), database_url="sqlite+aiosqlite:///:memory:"
    )
    run = await sealrelay("serve", "--config", str(config), "--processes", "2")
    assert run.code == 1
    assert run.error_line.startswith("Error: config error: database.url: sqlite")
    assert "SQLite needs a file" in run.error_line
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 1
    assert "database.url" in checked.err and "SQLite needs a file" in checked.err
    assert "Traceback" not in checked.err
    upgraded = await sealrelay("db", "upgrade", "--config", str(config))
    assert upgraded.code == 1 and "SQLite needs a file" in upgraded.error_line


async def test_the_number_of_processes_is_bounded(tmp_path: Path) -> None:
    config = serve_config(
        tmp_path,
        smtp_port=free_port(),
        database_url="postgresql+asyncpg://postgres@127.0.0.1/nowhere",
        extra={"server": "processes = 65"},
    )
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 1
    assert "server.processes" in checked.err and "64" in checked.err
    run = await sealrelay("serve", "--config", str(config), "--processes", "0")
    assert run.code == 2
    assert "--processes" in run.err and "0 is not in the range 1<=x<=64" in run.err


async def test_only_the_first_process_sweeps_and_sends_notices(
    database: Database, tmp_path: Path, sink: Sink
) -> None:
    """What process 0 runs and the others do not, in-process: the supervisor's children
    differ only in `singletons`."""
    rounds: list[str] = []
    swept = asyncio.Event()

    def recording(relay: Relay, name: str) -> None:
        async def sweep(now: object) -> SweepReport:
            rounds.append(f"{name} sweep")
            swept.set()
            return SweepReport(0, 0, 0)

        async def notices(stop: asyncio.Event) -> None:
            rounds.append(f"{name} notices")

        relay.sweeper = sweep  # type: ignore[assignment]
        relay.notices.run = notices  # type: ignore[method-assign]

    settings = relay_settings(tmp_path, sink.port)
    others = Relay(settings, roles=["worker"], db=database)
    first = Relay(settings, roles=["worker"], db=database)
    recording(others, "other")
    recording(first, "first")
    assert await first.prepare()
    try:
        await others.start_roles(singletons=False)  # its tasks run before the first's
        await first.start_roles(singletons=True)
        await asyncio.wait_for(swept.wait(), TIMEOUT)
        assert sorted(rounds) == ["first notices", "first sweep"]
    finally:
        others.request_stop()
        await asyncio.gather(*others._tasks, return_exceptions=True)
        await first.stop()
