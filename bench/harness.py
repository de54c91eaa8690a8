"""What the relay benchmarks share: a counting sink in a process of its own, a relay's
temporary config and database, logged-in client sessions that send and time the mail, and
the relay's CPU and memory as the kernel counts them.

bench/relay.py is the end-to-end run built on these; bench/compare.py, bench/links.py,
bench/mixed.py and the smaller benches take the parts they need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import psutil

from gateway.mail import dkim

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DOMAIN = "bench.example"
AGENT = f"agent@{DOMAIN}"
PASSWORD = "bench password 2026"
RECIPIENT = "prospect@example.com"
SEED = "seed-"  # recipients whose copies the sink passes on whole (bench/mixed.py reads links)
SELECTOR = "bench"
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


# -- the sink, in its own process ------------------------------------------------------------


class CountingSink:
    """aiosmtpd handler: reports (Message-ID, size) of each message and drops the bytes, and
    each new connection as ("", -1). It offers PIPELINING and (unless `chunking` is False)
    CHUNKING, as Postfix's smtpd does. A copy for a `SEED` recipient is reported with its
    bytes, so that its links can be read."""

    def __init__(self, conn: Connection, chunking: bool = True) -> None:
        self.conn = conn
        self.offers = ["250-PIPELINING", *(["250-CHUNKING"] if chunking else [])]
        self._greeted: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions (one per connection)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if session not in self._greeted:
            self._greeted.add(session)
            self.conn.send(("", -1))
        return [*responses[:-1], *self.offers, responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content
        match = _MESSAGE_ID.search(data, 0, 65536)
        message_id = match.group(1).decode() if match else ""
        if any(rcpt.startswith(SEED) for rcpt in envelope.rcpt_tos):
            self.conn.send((message_id, len(data), data))
        else:
            self.conn.send((message_id, len(data)))
        envelope.content = envelope.original_content = None
        return "250 2.0.0 Ok: counted"


def run_sink(port: int, conn: Connection, chunking: bool = True) -> None:
    from aiosmtpd.smtp import SMTP

    from tests.chunking_smtp import ChunkingSMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = CountingSink(conn, chunking)

        def make() -> SMTP:
            return ChunkingSMTP(
                handler, hostname="sink.bench", decode_data=False, data_size_limit=None
            )

        server = await loop.create_server(make, "127.0.0.1", port)
        conn.send(("ready", 0))
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@dataclass
class Tally:
    """What the sink reported, gathered in the bench process."""

    copies: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    octets: int = 0
    connections: int = 0  # the relay opened to the sink
    wanted: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    kept: list[bytes] = field(default_factory=list)  # copies for SEED recipients, whole
    kept_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, message_id: str, size: int, raw: bytes | None = None) -> None:
        if size < 0:
            self.connections += 1
            return
        if raw is not None:
            self.kept.append(raw)
            self.kept_changed.set()
        self.copies[message_id] = self.copies.get(message_id, 0) + 1
        self.first_seen.setdefault(message_id, time.perf_counter())
        self.octets += size
        self.check()

    def check(self) -> None:
        if self.wanted and self.wanted <= self.copies.keys():
            self.done.set()

    def complete_at(self) -> float | None:
        """When the last wanted message first arrived; None while any is missing."""
        if not self.done.is_set():
            return None
        return max(self.first_seen[message_id] for message_id in self.wanted)


@contextlib.contextmanager
def sink_process(
    port: int, tally: Tally, loop: asyncio.AbstractEventLoop, chunking: bool = True
) -> Iterator[int]:
    """Start the sink child; a reader thread feeds its reports into `tally`. Yields its pid."""
    parent, child = multiprocessing.get_context("spawn").Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(
        target=run_sink, args=(port, child, chunking), daemon=True
    )
    process.start()
    child.close()
    if not parent.poll(30) or parent.recv()[0] != "ready":
        process.kill()
        raise RuntimeError("the sink did not start")

    def read() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                report = parent.recv()
                loop.call_soon_threadsafe(tally.add, *report)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert process.pid is not None
        yield process.pid
    finally:
        process.terminate()
        process.join(5)
        parent.close()


# -- the relay subprocess --------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sealrelay_command() -> str:
    beside = Path(sys.executable).parent / "sealrelay"
    found = str(beside) if beside.exists() else shutil.which("sealrelay")
    if found is None:
        raise SystemExit("no `sealrelay` script beside the interpreter or on PATH")
    return found


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEALRELAY_")}


@contextlib.asynccontextmanager
async def database_url(backend: str, directory: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory}/relay.db"
        return
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    url = make_url(os.environ.get("SEALRELAY_TEST_POSTGRES_URL", DEFAULT_POSTGRES))
    name = f"sealrelay_bench_{secrets.token_hex(5)}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


NO_LINKS = """
[policy]
link_attachments_over = "1TiB"
link_total_over = "1TiB"
"""


def write_config(
    directory: Path,
    db_url: str,
    ports: tuple[int, int, int],
    size: int,
    links: bool,
    worker: Mapping[str, int] | None = None,
    link_over: str | None = None,
) -> Path:
    """The relay's settings; without `links`, no attachment is big enough to become a link.
    `worker`: [worker] settings to set, else the shipped ones. `link_over`: attachments over
    this size become links (and only they: the total no longer counts)."""
    smtp_port, web_port, sink_port = ports
    policy = "" if links else NO_LINKS
    if link_over is not None:
        policy = f'[policy]\nlink_attachments_over = "{link_over}"\nlink_total_over = "1TiB"\n'
    worker_lines = "".join(f"{key} = {value}\n" for key, value in (worker or {}).items())
    key_file = directory / "dkim.pem"
    dkim.write_private_key(dkim.generate_private_key(), key_file)
    config = directory / "relay.toml"
    config.write_text(
        f"""
[server]
hostname = "relay.bench.example"
public_url = "http://127.0.0.1:{web_port}"

[smtp]
listen = ["127.0.0.1:{smtp_port}"]
allow_plaintext_auth_on_loopback = true
max_message_size = {max(2 * size, 50 * 1024 * 1024)}

[web]
listen = "127.0.0.1:{web_port}"

[upstream]
url = "smtp://127.0.0.1:{sink_port}"
retry_base = 1
retry_max = 5

[database]
url = "{db_url}"

[worker]
{worker_lines}
[storage]
path = "{directory / "blobs"}"

[branding]
company_name = "Bench Immobilien GmbH"

[letter]
company_address = "Benchstraße 1, 12345 Benchstadt"
company_email = "widerruf@bench.invalid"
company_phone = "+49 30 0000000"
commission = "3,57 %"

{policy}
[dkim."{DOMAIN}"]
selector = "{SELECTOR}"
key_file = "{key_file}"
""",
        encoding="utf-8",
    )
    return config


def add_agent(config: Path) -> None:
    subprocess.run(
        [sealrelay_command(), "user", "add", AGENT, "--password-stdin", "--config", str(config)],
        input=f"{PASSWORD}\n",
        text=True,
        check=True,
        capture_output=True,
        env=child_environment(),
        timeout=60,
    )


async def wait_ready(process: asyncio.subprocess.Process, web_port: int, log: Path) -> None:
    url = f"http://127.0.0.1:{web_port}/healthz"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            if process.returncode is not None:
                raise SystemExit(f"the relay exited at start-up:\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise SystemExit(f"the relay was not ready in 30 s:\n{tail(log)}")
            await asyncio.sleep(0.1)


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def vm_hwm_kib(pid: int) -> int | None:
    """The kernel's high-water mark of the process's resident set (the true peak)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so start-up and logins drop out."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class Sampler:
    """Calls `sample` every `period` seconds while started, and once more as it stops."""

    period = 0.05

    _task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


class RssSampler(Sampler):
    """Samples RSS of the relay and its children every 50 ms; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            total = self.process.memory_info().rss
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)


# -- the messages ----------------------------------------------------------------------------


def make_body(size: int, header_size: int) -> bytes:
    """A multipart body: a short text and a base64 attachment bringing the mail to `size`."""
    boundary = "=_bench_" + secrets.token_hex(8)
    text = (
        "Guten Tag,\r\n\r\nanbei das Expos=C3=A9 zur Wohnung in der Musterstra=C3=9Fe.\r\n"
        "Mit freundlichen Gr=C3=BC=C3=9Fen\r\nAnna Agent\r\n"
    )
    head = (
        f"This is a MIME message.\r\n\r\n--{boundary}\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        f"{text}\r\n--{boundary}\r\n"
        'Content-Type: application/pdf; name="expose.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="expose.pdf"\r\n\r\n'
    ).encode()
    end = f"\r\n--{boundary}--\r\n".encode()
    room = size - header_size - len(head) - len(end)
    lines = max(1, room // 78)  # 76 base64 characters + CRLF per 57 bytes
    attachment = base64.encodebytes(os.urandom(57 * lines)).replace(b"\n", b"\r\n").rstrip()
    return (
        b"Content-Type: multipart/mixed; boundary="
        + boundary.encode()
        + b"\r\n\r\n"
        + (head + attachment + end)
    )


def make_header(run: str, number: int) -> tuple[str, bytes]:
    message_id = f"<bench-{run}-{number}@{DOMAIN}>"
    header = (
        f"From: Anna Agent <{AGENT}>\r\n"
        f"To: {RECIPIENT}\r\n"
        f"Subject: Bench {number}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return message_id, header.encode()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    accepted: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_250: float = 0.0


async def open_sessions(count: int, smtp_port: int) -> list[aiosmtplib.SMTP]:
    """Connected and logged-in clients (argon2 runs per login; that is not timed)."""

    async def login() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=smtp_port,
            start_tls=False,
            local_hostname="client.bench.example",
            timeout=300,
        )
        await client.connect()
        await client.login(AGENT, PASSWORD)
        return client

    return list(await asyncio.gather(*(login() for _ in range(count))))


async def send_all(
    clients: list[aiosmtplib.SMTP], messages: int, size: int, run: str, rate: float | None = None
) -> Results:
    """`messages` mails of about `size` bytes, spread over the sessions as each gets free;
    with `rate`, the k-th not before k/rate seconds after the first (an offered load below
    saturation, where CPU per message and time to 250 are those of a box not flat out)."""
    results = Results()
    body = make_body(size, len(make_header(run, 0)[1]))
    numbers = iter(range(messages))
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def session(client: aiosmtplib.SMTP) -> None:
        try:
            for number in numbers:
                if rate is not None and (wait := start + number / rate - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the offered load's clock, not a wait for an event
                message_id, header = make_header(run, number)
                began = time.perf_counter()
                try:
                    await client.sendmail(AGENT, [RECIPIENT], header + body)
                except aiosmtplib.SMTPResponseException as exc:
                    results.refused[message_id] = f"{exc.code} {exc.message}"
                    continue
                done = time.perf_counter()
                results.latencies.append(done - began)
                results.accepted.add(message_id)
                results.last_250 = max(results.last_250, done)
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()

    results.first_send = time.perf_counter()
    await asyncio.gather(*(session(client) for client in clients))
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the relay's processes so far."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def loop_thread_seconds(pids: list[int]) -> float:
    """CPU of the relays' main threads (the event loops); the rest is their worker threads
    (the database driver's, blob writes and fsyncs, DKIM keys)."""
    total = 0.0
    for pid in pids:
        for thread in psutil.Process(pid).threads():
            if thread.id == pid:
                total += thread.user_time + thread.system_time
    return total


async def cpu_until_idle(pids: list[int], quiet: float = 0.02, limit: float = 30) -> float:
    """The relay's CPU once it has gone idle: what it does after the sink's 250 (recording
    the outcome) is part of a message's cost. Idle means under `quiet` CPU seconds in 0.5 s."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = cpu_seconds(pids)
        if now - last < quiet:
            return now
        last = now
    return last


async def relay_pids(pid: int, processes: int, smtp_port: int) -> list[int]:
    """The relay's processes: the one started, and with --processes its children once each
    listens on the SMTP port (the figures sum over them)."""
    if processes == 1:
        return [pid]
    deadline = time.monotonic() + 30
    while True:
        children = [child.pid for child in psutil.Process(pid).children()]
        listening = [c for c in children if listens(c, smtp_port)]
        if len(listening) == processes:
            return [pid, *children]
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(listening)} of {processes} relay processes listen")
        await asyncio.sleep(0.1)


def listens(pid: int, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return True
    return False


def database_state(prefill: int) -> str:
    """How the database began, for a report's first line."""
    return (
        f"the database holding {prefill} delivered messages first" if prefill else "a new database"
    )
