"""Nothing lost: 250 means durable, delivery is at-least-once, a restart finishes the work.

The relay runs as a real `sealrelay serve` process. A burst of mail from concurrent sessions
is cut short by SIGKILL; the relay is started again and must deliver every message that got
a 250 before the kill. Copies delivered twice are allowed (at-least-once) and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from gateway.config import WorkerSettings
from gateway.mail import headers
from gateway.store.db import Database
from gateway.store.models import Delivery
from tests.conftest import AGENT, PASSWORD, Harness, make_message
from tests.support import LETTER_TOML, Sink, free_port

pytestmark = pytest.mark.slow

BURST = 200
SESSIONS = 10
KILL_AFTER = 80
START_TIMEOUT = 20.0
DELIVERY_TIMEOUT = 60.0
_QUEUED = re.compile(r'^sealrelay_queue_deliveries\{status="queued"\} (\S+)$', re.MULTILINE)


def sealrelay_command() -> str:
    """The `sealrelay` script of the environment running the tests (.venv locally and in CI)."""
    beside = Path(sys.executable).parent / "sealrelay"
    if beside.exists():
        return str(beside)
    found = shutil.which("sealrelay")
    if found is None:
        raise RuntimeError("no `sealrelay` script beside the interpreter or on PATH")
    return found


def child_environment() -> dict[str, str]:
    """The test's environment without SEALRELAY_* settings that would override the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SEALRELAY_")}


@dataclass
class RelayProcess:
    """`sealrelay serve` in a subprocess with its own config, database and ports."""

    directory: Path
    database_url: str
    upstream_port: int
    smtp_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    serve_args: tuple[str, ...] = ()  # e.g. ("--processes", "2")
    extra_config: str = ""  # TOML appended to the config (more sections)
    lease_seconds: float = 2  # short: a killed relay's claims return soon

    @property
    def config(self) -> Path:
        return self.directory / "relay.toml"

    def write_config(self) -> None:
        self.config.write_text(
            f"""
[server]
hostname = "relay.durability.test"
public_url = "http://127.0.0.1:{self.web_port}"

[smtp]
listen = ["127.0.0.1:{self.smtp_port}"]
allow_plaintext_auth_on_loopback = true
timeout = 30

[web]
listen = "127.0.0.1:{self.web_port}"

[upstream]
url = "smtp://127.0.0.1:{self.upstream_port}"
timeout = 10
retry_base = 0.2
retry_max = 1

[database]
url = "{self.database_url}"

[storage]
path = "{self.directory / "blobs"}"

[worker]
lease_seconds = {self.lease_seconds}
poll_seconds = 0.2
"""
            + LETTER_TOML
            + self.extra_config,
            encoding="utf-8",
        )

    async def add_agent(self) -> None:
        child = await asyncio.create_subprocess_exec(
            sealrelay_command(),
            "user",
            "add",
            AGENT,
            "--password-stdin",
            "--config",
            str(self.config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_environment(),
        )
        output, _ = await asyncio.wait_for(child.communicate(f"{PASSWORD}\n".encode()), 30)
        assert child.returncode == 0, output.decode(errors="replace")

    async def start(self) -> None:
        self.starts += 1
        log = (self.directory / f"relay-{self.starts}.log").open("wb")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sealrelay_command(),
                "serve",
                "--config",
                str(self.config),
                *self.serve_args,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=child_environment(),
                start_new_session=True,
            )
        finally:
            log.close()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Poll /healthz until the relay answers (and SMTP listens: it starts first)."""
        url = f"http://127.0.0.1:{self.web_port}/healthz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"relay exited at start-up:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as response:
                        if response.status == 200:
                            return
                if loop.time() > deadline:
                    raise AssertionError(f"relay not ready in {START_TIMEOUT}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    async def queued(self) -> float:
        """Copies still waiting, as the relay's /metrics reports them."""
        url = f"http://127.0.0.1:{self.web_port}/metrics"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(url) as response,
        ):
            body = await response.text()
        match = _QUEUED.search(body)
        assert match is not None, body[:500]
        return float(match.group(1))

    def kill(self) -> None:
        """SIGKILL to the relay and, with --processes, its processes at once, as a power
        cut would: the relay runs in a process group of its own."""
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def wait_exit(self, timeout: float = 15) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await self.wait_exit()
        except TimeoutError:
            self.kill()
            await self.wait_exit()

    def log_tail(self, lines: int = 40) -> str:
        path = self.directory / f"relay-{self.starts}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def burst_message(tag: str, number: int) -> tuple[str, EmailMessage]:
    message_id = f"<dur-{tag}-{number:04d}@broker.example>"
    message = make_message(subject=f"Durability {tag} #{number}", body=f"Message {number}\n")
    message["Message-ID"] = message_id
    return message_id, message


def message_ids(sink: Sink) -> Counter[str]:
    """How many copies of each Message-ID the sink got."""
    return Counter(
        headers.first_value(headers.fields_of(received.data), "message-id") or ""
        for received in sink.messages
    )


async def wait_until_delivered(
    sink: Sink, wanted: set[str], relay: RelayProcess | None = None
) -> None:
    """Bounded wait until the sink holds every wanted Message-ID (and the queue is empty)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DELIVERY_TIMEOUT
    while True:
        missing = wanted - set(message_ids(sink))
        if not missing and (relay is None or await relay.queued() == 0):
            return
        if loop.time() > deadline:
            detail = relay.log_tail() if relay is not None else ""
            raise AssertionError(
                f"{len(missing)} accepted messages never arrived, e.g. {sorted(missing)[:5]}"
                f"\n{detail}"
            )
        await asyncio.sleep(0.1)


@dataclass
class Burst:
    """What the clients saw: which messages got 250 and which failed (and how)."""

    accepted: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)


async def send_burst(relay: RelayProcess, tag: str) -> Burst:
    """BURST messages over SESSIONS reused sessions; SIGKILL the relay after KILL_AFTER 250s."""
    pending: asyncio.Queue[tuple[str, EmailMessage]] = asyncio.Queue()
    for number in range(BURST):
        pending.put_nowait(burst_message(tag, number))
    burst = Burst()

    async def session() -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.smtp_port,
            start_tls=False,
            local_hostname="client.durability.test",
            timeout=15,
        )
        try:
            await client.connect()
            await client.login(AGENT, PASSWORD)
            while not pending.empty():
                message_id, message = pending.get_nowait()
                errors, reply = await client.send_message(message)
                assert not errors, errors
                assert reply.startswith("2.0.0"), reply
                burst.accepted.add(message_id)
                if len(burst.accepted) == KILL_AFTER:
                    relay.kill()
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Expected once the relay is killed: the message in flight has no reply.
            burst.failures[type(exc).__name__] += 1
        finally:
            client.close()

    await asyncio.gather(*(session() for _ in range(SESSIONS)))
    return burst


@pytest.fixture
async def relay_process(
    database_url: str, sink: Sink, tmp_path: Path
) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(tmp_path, database_url, sink.port)
    relay.write_config()
    await relay.add_agent()
    try:
        yield relay
    finally:
        await relay.stop()


@contextlib.contextmanager
def report(title: str) -> Iterator[dict[str, object]]:
    """Print the figures (pytest shows them with -s or -rP), even when an assert fails."""
    figures: dict[str, object] = {}
    try:
        yield figures
    finally:
        print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def test_sigkill_mid_burst_loses_no_accepted_message(
    relay_process: RelayProcess, sink: Sink, database_url: str
) -> None:
    await sigkill_mid_burst(relay_process, sink, make_url(database_url).get_backend_name())


async def test_sigkill_with_chunks_sent_with_their_envelopes_loses_nothing(
    relay_process: RelayProcess, sink: Sink, database_url: str
) -> None:
    """An upstream offering PIPELINING and CHUNKING, as Microsoft 365 and Gmail do: each
    small copy leaves whole in its first write, so every copy in flight at the kill may
    arrive and be sent again; still within the bound, and none lost."""
    sink.pipelining = sink.chunking = True
    await sigkill_mid_burst(relay_process, sink, make_url(database_url).get_backend_name())
    assert all(copy.chunks == 1 for copy in sink.messages)


async def test_sigkill_of_two_processes_on_one_sqlite_file_loses_nothing(
    sink: Sink, tmp_path: Path
) -> None:
    """Both processes write one SQLite file and die together mid-commit: the file's WAL
    is recovered by the next start, and every 250 is still delivered."""
    relay = RelayProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path}/relay.db",
        sink.port,
        serve_args=("--processes", "2"),
        # long enough that neither process, starved of CPU, loses its claims to the other
        # before the kill (each would then send them: at least once, not a crash's doing)
        lease_seconds=6,
    )
    relay.write_config()
    await relay.add_agent()
    try:
        await sigkill_mid_burst(relay, sink, "sqlite-2")
    finally:
        await relay.stop()


async def sigkill_mid_burst(relay_process: RelayProcess, sink: Sink, tag: str) -> None:
    """A burst cut short by SIGKILL, the relay started again: every 250 delivered. `tag`
    names the burst's messages."""
    await relay_process.start()

    with report(f"durability {tag}") as figures:
        burst = await send_burst(relay_process, tag)
        exit_code = await relay_process.wait_exit()
        figures["accepted_before_kill"] = len(burst.accepted)
        figures["client_errors"] = dict(burst.failures)
        figures["at_sink_at_kill"] = len(sink.messages)
        assert exit_code == -signal.SIGKILL
        assert len(burst.accepted) >= KILL_AFTER
        assert len(burst.accepted) < BURST, "the kill came too late to cut the burst short"

        await relay_process.start()  # same config; nothing is sent again
        await wait_until_delivered(sink, burst.accepted, relay_process)

        copies = message_ids(sink)
        lost = burst.accepted - set(copies)
        figures["delivered_unique"] = len(copies)
        figures["delivered_accepted"] = len(burst.accepted & set(copies))
        figures["copies_at_sink"] = sum(copies.values())
        figures["duplicates"] = sum(n - 1 for n in copies.values())
        figures["lost"] = len(lost)
        assert not lost
        assert set(copies) <= {burst_message(tag, n)[0] for n in range(BURST)}
        # A worker slot is given up only once its group's outcome is committed, so the
        # copies sent and not yet recorded when the kill came are at most the slots: the
        # relay's `[worker] concurrency`, shared by its processes. (A destination's turn,
        # `destination_concurrency`, ends with the send: it does not bound them.)
        assert figures["duplicates"] <= WorkerSettings().concurrency


async def deferred_twice(db: Database, count: int) -> None:
    """Until each of `count` copies has been tried and deferred at least twice (bounded)."""
    query = select(func.count()).select_from(Delivery).where(Delivery.attempts >= 2)
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        while True:
            async with db.transaction() as session:
                if await session.scalar(query) == count:
                    return
            await asyncio.sleep(0.05)


async def test_mail_accepted_while_upstream_is_down_is_delivered_when_it_returns(
    relay: Harness,
) -> None:
    sink = relay.sink
    await sink.stop()
    wanted = set()
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        for number in range(20):
            message_id, message = burst_message("upstream-down", number)
            await client.send_message(message)
            wanted.add(message_id)
    await deferred_twice(relay.relay.db, len(wanted))  # refused attempts while the sink is down
    assert not sink.messages

    await sink.start()
    with report("upstream down") as figures:
        await wait_until_delivered(sink, wanted)
        copies = message_ids(sink)
        figures["accepted"] = len(wanted)
        figures["delivered"] = len(wanted & set(copies))
        figures["duplicates"] = sum(n - 1 for n in copies.values())
        assert wanted <= set(copies)
