"""Sealrelay beside Postfix (and nginx) on the same box: the same load through each, in turns.

    .venv/bin/python bench/compare.py --quick
    .venv/bin/python bench/compare.py --rounds 3 --messages 3000 --workloads small
    .venv/bin/python bench/compare.py --rounds 3 --backends sqlite,postgres

One `smtp-sink` (Postfix's counting sink, bodies thrown away) receives everything. A private
Postfix (tests/postfix_core.py: loopback only, relayhost = the sink) and one `sealrelay serve`
per database backend (DKIM on, a `[[smtp.trusted]]` listener for 127.0.0.1 so that
`smtp-source` sends without AUTH) take the same load from `smtp-source`, one after another,
round after round. With `--forwarder`, bench/forwarder.py (aiosmtpd in, aiosmtplib out,
nothing stored or signed) takes its turn too: the ceiling of the Python stack sealrelay is
built on. Downloads: a 100 MiB file behind a sealrelay link against nginx serving the very
same blob file from disk. bench/README.md says what each figure means.

Exits 1 when a run failed (a refusal, a message missing at the sink, a short download), 2 when
a tool is missing (never a silent skip).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import psutil
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    AGENT,
    DOMAIN,
    RECIPIENT,
    Sampler,
    child_environment,
    database_url,
    free_port,
    percentile,
    sealrelay_command,
    tail,
    wait_ready,
    write_config,
)
from bench.links import (  # noqa: E402
    MIB,
    Inbox,
    link_tokens,
    make_attachment,
    make_message,
    one_round,
    verify,
)
from bench.links import sink_process as keeping_sink  # noqa: E402
from bench.options import comma_separated  # noqa: E402
from bench.prefill import prefill as fill  # noqa: E402
from tests.opendkim_core import OpenDkim, OpenDkimMissing, opendkim_command  # noqa: E402
from tests.postfix_core import PostfixInstance, PostfixMissing, postfix_command  # noqa: E402

MB = 1_000_000  # mail throughput in MB/s (10^6 bytes), downloads in MiB/s
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class Failed(Exception):
    """A run whose figures would mean nothing; the bench stops and exits 1."""


class Missing(Exception):
    """A tool the comparison needs is not installed; the bench exits 2 saying how to get it."""


# -- process trees ---------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and every descendant, living or already reaped (a
    reaped child's time shows in its parent's children_* times: Postfix's short-lived
    smtpd and smtp processes count too)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident pages, each shared page split among its sharers (so
    a tree's sum counts Postfix's shared libraries once, unlike a sum of RSS)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeMemory(Sampler):
    """Samples process trees' summed RSS and summed PSS every 100 ms; keeps each peak."""

    period = 0.1

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.peak_rss = 0
        self.peak_pss = 0

    def sample(self) -> None:
        rss = pss = 0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss += process.memory_info().rss
                        pss += pss_bytes(process.pid)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def database_cpu(server: Server) -> dict[int, float]:
    """The PostgreSQL backends serving the server's connections now (its processes' too,
    with --processes), with their CPU seconds so far: the database's work is part of what a
    message costs on PostgreSQL."""
    if server.database_port is None:
        return {}
    try:
        server_process = psutil.Process(server.pid)
        ours = {
            c.laddr.port
            for process in (server_process, *server_process.children(recursive=True))
            for c in process.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == server.database_port
        }
        backends = {
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.pid and c.raddr and c.laddr.port == server.database_port and c.raddr.port in ours
        }
    except psutil.Error:
        return {}
    found: dict[int, float] = {}
    for pid in backends:
        with contextlib.suppress(psutil.Error):
            found[pid] = sum(psutil.Process(pid).cpu_times()[:2])
    return found


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two `database_cpu` looks (a backend new at the end: all of it)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


async def wait_listening(port: int, process: asyncio.subprocess.Process, what: str) -> None:
    """Until something accepts on 127.0.0.1:port; Failed at once if `process` exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.returncode is not None:
            raise Failed(f"{what} exited at start-up with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise Failed(f"{what} did not listen on 127.0.0.1:{port} in time") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def stop_process(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    """Signal our child by its pid, wait (bounded), then kill it and what is left of its tree."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        raise Missing(
            f"{name} is missing: apt-get install -y {package}"
            " (scripts/with-test-services installs it)"
        )
    return found


# -- smtp-sink: counts what arrives ----------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink with running counters (-c): `count` is the messages it has taken."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.changed = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        command = [postfix_command("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # it refuses to keep root's privileges
        self.process = await asyncio.create_subprocess_exec(
            *command,
            f"127.0.0.1:{self.port}",
            "1024",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        await wait_listening(self.port, self.process, "smtp-sink")

    async def _read(self) -> None:
        """Its counter lines ("sess=2 quit=2 mesg=4", each ended by CR) as they come."""
        assert self.process is not None and self.process.stdout is not None
        pending = b""
        while chunk := await self.process.stdout.read(65536):
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in lines:
                if found := re.search(rb"\bmesg=(\d+)", line):
                    self.count = int(found.group(1))
                    self.changed.set()

    async def reach(self, count: int, seconds: float) -> float:
        """Until the sink has taken `count` messages in all (at most `seconds`); when it got
        there (perf_counter)."""
        deadline = time.monotonic() + seconds
        while self.count < count:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"the sink has {self.count} messages after {seconds} s, want {count}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return time.perf_counter()

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# -- the servers under test ------------------------------------------------------------------


@dataclass
class Server:
    """One relay under test: where smtp-source sends, and the pid whose tree is measured."""

    name: str
    port: int
    pid: int
    database_port: int | None = None  # PostgreSQL's: its backends serving `pid` count too
    helpers: tuple[int, ...] = ()  # processes it relies on (a milter), measured with it

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.pid, *self.helpers)

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.pids)


async def start_postfix(
    directory: Path, sink_port: int, stack: contextlib.AsyncExitStack, *, signed: bool = False
) -> Server:
    """A private Postfix relaying everything to the sink; stopped (by its pid) on the way out.

    `signed`: with OpenDKIM as its milter (tests/opendkim_core.py), signing the mail of the
    sender's domain as sealrelay does; its CPU and memory count as Postfix's. Mail is refused
    for now when the milter does not answer (milter_default_action = tempfail), so a run whose
    milter failed fails rather than measuring an unsigned Postfix."""
    name = "postfix-opendkim" if signed else "postfix"
    main_cf = ["message_size_limit = 1073741824", "mailbox_size_limit = 0"]
    helpers: tuple[int, ...] = ()
    if signed:
        milter = OpenDkim(directory / "opendkim", DOMAIN)
        stack.push_async_callback(milter.stop)
        await milter.start()
        assert milter.process is not None
        helpers = (milter.process.pid,)
        main_cf += [f"smtpd_milters = {milter.milter}", "milter_default_action = tempfail"]
    instance = PostfixInstance(
        directory / name,
        relayhost=f"[127.0.0.1]:{sink_port}",
        main_cf=main_cf,
    )

    async def stop() -> None:
        await instance.stop()
        instance.remove()

    stack.push_async_callback(stop)
    await instance.start()
    assert instance._master is not None  # the `postfix start-fg` child: master's tree
    return Server(name, instance.smtpd_port, instance._master.pid, helpers=helpers)


TRUSTED = """
[[smtp.trusted]]
name = "loadgen"
service = "smtp-source"
networks = ["127.0.0.1/32"]
listen = ["127.0.0.1:{port}"]
"""


@dataclass
class Relay:
    """A `sealrelay serve` subprocess: its directory, config and ports."""

    name: str
    directory: Path
    trusted_port: int
    web_port: int
    process: asyncio.subprocess.Process
    database_port: int | None

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


async def start_sealrelay(
    backend: str,
    sink_port: int,
    largest: int,
    stack: contextlib.AsyncExitStack,
    *,
    links: bool = False,
    processes: int = 1,
    prefill: int = 0,
) -> Relay:
    """bench/relay.py's relay (DKIM for the sender domain, SQLite in its temp directory or a
    fresh PostgreSQL database, dropped afterwards) plus a trusted listener for smtp-source.
    `prefill`: delivered messages in the database before it starts (bench/prefill.py)."""
    directory = Path(tempfile.mkdtemp(prefix=f"sealrelay-compare-{backend}-"))
    stack.callback(shutil.rmtree, directory, True)
    db_url = await stack.enter_async_context(database_url(backend, directory))
    await fill(db_url, prefill)
    smtp_port, web_port, trusted_port = free_port(), free_port(), free_port()
    config = write_config(directory, db_url, (smtp_port, web_port, sink_port), largest, links)
    with config.open("a", encoding="utf-8") as out:
        out.write(TRUSTED.format(port=trusted_port))
    log = directory / "relay.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sealrelay_command(),
            "serve",
            "--config",
            str(config),
            *(("--processes", str(processes)) if processes > 1 else ()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=child_environment(),
        )
    stack.push_async_callback(stop_process, process)
    try:
        await wait_ready(process, web_port, log)
    except SystemExit as exc:
        raise Failed(str(exc)) from None
    database_port = (make_url(db_url).port or 5432) if backend == "postgres" else None
    return Relay(f"sealrelay-{backend}", directory, trusted_port, web_port, process, database_port)


NGINX_CONF = """\
{user}worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/pdf;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /file {{ alias {file}; }}
    }}
}}
"""


async def start_forwarder(sink_port: int, stack: contextlib.AsyncExitStack) -> Server:
    """bench/forwarder.py on a free port, handing everything to the sink."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "forwarder.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        env=child_environment(),
    )
    stack.push_async_callback(stop_process, process)
    await wait_listening(port, process, "bench/forwarder.py")
    return Server("aiosmtpd-forwarder", port, process.pid)


async def start_nginx(file: Path, stack: contextlib.AsyncExitStack) -> Server:
    """nginx in the foreground on a private prefix and a free loopback port, serving `file` at
    /file; stopped by its pid (SIGQUIT: graceful) on the way out."""
    nginx = tool("nginx", "nginx")
    prefix = Path(tempfile.mkdtemp(prefix="sealrelay-compare-nginx-"))
    stack.callback(shutil.rmtree, prefix, True)
    port = free_port()
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # its workers must read the blob
    conf.write_text(
        NGINX_CONF.format(user=user, prefix=prefix, port=port, file=file), encoding="utf-8"
    )
    process = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stack.push_async_callback(stop_process, process, signal.SIGQUIT)
    try:
        await wait_listening(port, process, "nginx")
    except Failed as exc:
        raise Failed(f"{exc}: {tail(prefix / 'error.log')}") from None
    return Server("nginx", port, process.pid)


# -- mail workloads --------------------------------------------------------------------------


@dataclass
class MailRun:
    """One server's turn at one workload."""

    server: str
    messages: int
    seconds: float
    octets: int
    cpu_seconds: float
    peak_rss: int
    peak_pss: int
    database_cpu_seconds: float = 0.0  # PostgreSQL's backends serving the relay
    load_cpu_seconds: float = 0.0  # smtp-source and smtp-sink: the load's share of the cores
    latencies: list[float] = field(default_factory=list)
    late: int = 0  # paced: messages that started over LATE after their time, every session busy

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.octets / MB / self.seconds

    @property
    def cpu_ms_per_message(self) -> float:
        """The server's CPU and its database's (PostgreSQL's backends), per message."""
        return (self.cpu_seconds + self.database_cpu_seconds) * 1000 / self.messages

    @property
    def database_ms_per_message(self) -> float:
        return self.database_cpu_seconds * 1000 / self.messages

    @property
    def load_ms_per_message(self) -> float:
        return self.load_cpu_seconds * 1000 / self.messages

    @property
    def ceiling(self) -> float:
        """Messages per second were every core busy with this server and the load alone:
        on a box whose cores the load shares, what no waiting could beat."""
        per_message = (self.cpu_ms_per_message + self.load_ms_per_message) / 1000
        return (os.cpu_count() or 1) / per_message if per_message else float("nan")


def probe_message(size: int) -> bytes:
    """A plain mail of about `size` bytes (as smtp-source's -l), with headers of its own."""
    header = (
        f"From: <{AGENT}>\r\nTo: <{RECIPIENT}>\r\nSubject: probe\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <probe-{secrets.token_hex(8)}@{DOMAIN}>\r\n\r\n"
    ).encode()
    line = b"La La La " * 8 + b"\r\n"
    return header + line * max(1, size // len(line))


async def probe(port: int, size: int, stop: asyncio.Event, latencies: list[float]) -> int:
    """One SMTP session alongside smtp-source, one message after another until `stop`:
    the time from MAIL FROM to the 250 after DATA of each. Returns how many it sent."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
        local_hostname="probe.bench.example",
        timeout=120,
    )
    await client.connect()
    sent = 0
    try:
        while not stop.is_set():
            message = probe_message(size)
            began = time.perf_counter()
            try:
                await client.sendmail(AGENT, [RECIPIENT], message)
            except aiosmtplib.SMTPResponseException as exc:
                raise Failed(f"the latency probe was refused: {exc.code} {exc.message}") from exc
            latencies.append(time.perf_counter() - began)
            sent += 1
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
    return sent


async def settle(pid: int, limit: float = 15.0) -> None:
    """Until the server's tree has used (almost) no CPU for half a second, at most `limit`
    seconds: what it does after the sink's 250 (recording the outcome) is its cost too, and
    must not run into the next server's turn."""
    deadline = time.monotonic() + limit
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # another process's CPU: nothing to await but the clock
        now = tree_cpu_seconds(pid)
        if now - last < 0.02:
            return
        last = now


class Meter:
    """One server's turn measured: its CPU, its database's, the load's (smtp-sink's, the
    reaped smtp-source runs', and with `own_load` this script's clients') and its memory,
    from its start until every message is at the sink and the server has gone idle."""

    def __init__(self, server: Server, sink: SmtpSink, *, own_load: bool = False) -> None:
        self.server, self.sink, self.own_load = server, sink, own_load
        self.start_count = sink.count
        self.cpu_before = server.cpu_seconds()
        self.database_before = database_cpu(server)
        self.load_before = self._load()
        self.sampler = TreeMemory(*server.pids)
        self.sampler.start()
        self.began = time.perf_counter()

    def _load(self) -> float:
        return load_cpu_seconds(self.sink) + (own_cpu_seconds() if self.own_load else 0.0)

    async def run(
        self, messages: int, size: int, seconds: float, latencies: list[float], late: int = 0
    ) -> MailRun:
        """The turn of `messages` of `size` bytes, once the sink has them all."""
        done = await self.sink.reach(self.start_count + messages, seconds)
        load = self._load() - self.load_before
        await settle(self.server.pid)
        await self.sampler.stop()
        return MailRun(
            server=self.server.name,
            messages=messages,
            seconds=done - self.began,
            octets=messages * size,
            cpu_seconds=self.server.cpu_seconds() - self.cpu_before,
            database_cpu_seconds=cpu_spent(self.database_before, database_cpu(self.server)),
            load_cpu_seconds=load,
            peak_rss=self.sampler.peak_rss,
            peak_pss=self.sampler.peak_pss,
            latencies=latencies,
            late=late,
        )


async def mail_run(
    server: Server,
    sink: SmtpSink,
    *,
    messages: int,
    size: int,
    sessions: int,
    probes: int,
    seconds: float,
    reuse: bool = False,
) -> MailRun:
    """smtp-source sends `messages` of `size` bytes over `sessions`, `probes` sessions of our
    own alongside; the run ends when the sink has every message (theirs and the probes')."""
    meter = Meter(server, sink)
    latencies: list[float] = []
    stop = asyncio.Event()
    source = await asyncio.create_subprocess_exec(
        postfix_command("smtp-source"),
        "-s", str(sessions), "-m", str(messages), "-l", str(size),
        *(["-d"] if reuse else []),
        "-f", AGENT, "-t", RECIPIENT, f"127.0.0.1:{server.port}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    probing = [
        asyncio.create_task(probe(server.port, size, stop, latencies)) for _ in range(probes)
    ]
    try:
        out, _ = await asyncio.wait_for(source.communicate(), seconds)
    except TimeoutError:
        source.kill()
        await source.wait()
        raise Failed(f"smtp-source against {server.name} took over {seconds} s") from None
    finally:
        stop.set()
    probed = sum(await asyncio.gather(*probing))
    if source.returncode != 0:
        text = out.decode("utf-8", errors="replace")[-2000:]
        raise Failed(f"smtp-source against {server.name} exited {source.returncode}: {text}")
    return await meter.run(messages + probed, size, seconds, latencies)


LATE = 0.010  # seconds after its time a paced message may start and still count as on time


async def paced_run(
    server: Server,
    sink: SmtpSink,
    *,
    messages: int,
    size: int,
    sessions: int,
    rate: float,
    seconds: float,
    reuse: bool = False,
) -> MailRun:
    """`messages` of `size` bytes offered at `rate` a second, the k-th due k/rate seconds after
    the start whether or not the ones before have been answered, over at most `sessions`
    sessions of our own (a new connection each message, as smtp-source; `reuse`: one each).

    smtp-source sends as fast as the server answers, so its time to 250 is mostly the wait
    behind the other sessions: at saturation, 20 sessions in flight take 20 / throughput
    seconds a message, whatever the server does. Below saturation the time is the server's
    own. Every message's time from MAIL FROM to its 250 counts; a message that could not
    start within LATE of its time, every session being busy, is counted as `late`."""
    meter = Meter(server, sink, own_load=True)
    latencies: list[float] = []
    late = 0
    numbers = iter(range(messages))
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def connected() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=server.port,
            start_tls=False,
            local_hostname="paced.bench.example",
            timeout=120,
        )
        await client.connect()
        await client.ehlo()
        return client

    async def session() -> None:
        nonlocal late
        client = await connected() if reuse else None
        try:
            for number in numbers:
                due = start + number / rate
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the offered load's clock, not a wait for an event
                elif -wait > LATE:
                    late += 1
                one = client or await connected()
                sending = time.perf_counter()
                try:
                    await one.sendmail(AGENT, [RECIPIENT], probe_message(size))
                except aiosmtplib.SMTPResponseException as exc:
                    raise Failed(f"{server.name} refused a paced message: {exc}") from exc
                latencies.append(time.perf_counter() - sending)
                if client is None:
                    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                        await one.quit()
        finally:
            if client is not None:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()

    try:
        await asyncio.wait_for(asyncio.gather(*(session() for _ in range(sessions))), seconds)
    except TimeoutError:
        raise Failed(f"the paced load against {server.name} took over {seconds} s") from None
    return await meter.run(messages, size, seconds, latencies, late)


def own_cpu_seconds() -> float:
    """This script's CPU so far: the paced load's clients run in it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_cpu_seconds(sink: SmtpSink) -> float:
    """CPU so far of smtp-sink and of this script's reaped children (every smtp-source run
    once it has ended; the servers under test are not reaped while they run)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert sink.process is not None
    return children.ru_utime + children.ru_stime + tree_cpu_seconds(sink.process.pid)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds == seconds else "n/a"


def print_mail_run(workload: str, round_number: int, run: MailRun) -> None:
    figures = [
        f"{run.msg_per_s:.1f} msg/s delivered",
        f"{run.mb_per_s:.1f} MB/s",
        f"CPU {run.cpu_ms_per_message:.2f} ms/msg"
        + (
            f" ({run.database_ms_per_message:.2f} of it PostgreSQL)"
            if run.database_cpu_seconds
            else ""
        ),
        f"load CPU {run.load_ms_per_message:.2f} ms/msg",
        f"peak RSS {run.peak_rss / MIB:.0f} MiB (PSS {run.peak_pss / MIB:.0f} MiB)",
    ]
    if run.latencies:
        counted = "every message" if workload == "paced" else f"{len(run.latencies)} probes"
        figures.insert(
            2,
            f"time to 250 p50 {ms(percentile(run.latencies, 0.5))}"
            f" p99 {ms(percentile(run.latencies, 0.99))} ({counted})",
        )
    if workload == "paced":
        figures.append(f"{run.late} started late")
    print(f"  round {round_number} {workload:5} {run.server:18} " + ", ".join(figures), flush=True)


# -- downloads -------------------------------------------------------------------------------


@dataclass
class DownloadRun:
    server: str
    seconds: float
    octets: int
    cpu_seconds: float
    peak_rss: int
    peak_pss: int

    @property
    def mib_per_s(self) -> float:
        return self.octets / MIB / self.seconds


async def download_pair(args: argparse.Namespace, backend: str) -> dict[str, list[DownloadRun]]:
    """One mail with a `--download-mib` attachment through a relay with links on; then its
    file from the relay's link and the same blob file from nginx, `--clients` at once, the two
    servers taking turns for `--rounds` rounds."""
    size = args.download_mib * MIB
    runs: dict[str, list[DownloadRun]] = {"nginx": [], f"sealrelay-{backend}": []}
    loop = asyncio.get_running_loop()
    inbox = Inbox()
    sink_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(keeping_sink(sink_port, inbox, loop))
        relay = await start_sealrelay(
            backend, sink_port, size * 2, stack, links=True, processes=args.processes
        )
        attachment = make_attachment(size)
        sha256 = hashlib.sha256(attachment).hexdigest()
        message_id = f"<compare-{secrets.token_hex(4)}@{DOMAIN}>"
        mail = make_message(message_id, ["downloader@example.com"], "Big", attachment, "big.pdf")
        del attachment
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.trusted_port, start_tls=False, timeout=300
        )
        async with client:
            try:
                await client.sendmail(AGENT, ["downloader@example.com"], mail)
            except aiosmtplib.SMTPResponseException as exc:
                raise Failed(f"the {args.download_mib} MiB mail was refused: {exc}") from exc
        del mail
        if not await inbox.wait(lambda: bool(inbox.of(message_id)), args.timeout):
            raise Failed("the download mail's copy never reached the sink")
        copy = inbox.of(message_id)[0]
        tokens = link_tokens(copy.raw, relay.public_url) if copy.raw else []
        if len(tokens) != 1:
            raise Failed(f"want one link in the copy ({copy.size} bytes), found {tokens}")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        clients = [
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1))
            for _ in range(args.clients)
        ]
        for http in clients:
            stack.push_async_callback(http.close)
        async with clients[0].get(f"{relay.public_url}/d/{tokens[0]}") as response:
            page = await response.text()
        hrefs = re.findall(rf'href="(/d/{re.escape(tokens[0])}/f/[^"]+)"', page)
        if len(hrefs) != 1:
            raise Failed(f"want one file link on the download page, found {hrefs}")
        blob = relay.directory / "blobs" / sha256[:2] / sha256[2:4] / sha256
        if not blob.is_file():
            raise Failed(f"the attachment's blob is not at {blob}")
        nginx = await start_nginx(blob, stack)
        servers = {
            nginx.name: (f"http://127.0.0.1:{nginx.port}/file", nginx.pid),
            f"sealrelay-{backend}": (f"{relay.public_url}{hrefs[0]}", relay.process.pid),
        }
        for name, (url, _) in servers.items():  # also warms the page cache for both
            if wrong := await verify(clients[0], url, size, sha256):
                raise Failed(f"{name}: the verifying download failed: {wrong}")
        for number in range(1, args.rounds + 1):
            order = list(servers.items())
            for name, (url, pid) in order if number % 2 else reversed(order):
                cpu_before = tree_cpu_seconds(pid)
                sampler = TreeMemory(pid)
                sampler.start()
                result = await one_round(clients, url, size)
                await sampler.stop()
                if result.failures:
                    raise Failed(f"{name}: {result.failures[:3]}")
                run = DownloadRun(
                    name,
                    result.seconds,
                    result.octets,
                    tree_cpu_seconds(pid) - cpu_before,
                    sampler.peak_rss,
                    sampler.peak_pss,
                )
                runs[name].append(run)
                print(
                    f"  round {number} dl    {name:18} {run.mib_per_s:.0f} MiB/s"
                    f" ({args.clients} x {args.download_mib} MiB), server CPU"
                    f" {run.cpu_seconds:.2f} s, peak RSS {run.peak_rss / MIB:.0f} MiB"
                    f" (PSS {run.peak_pss / MIB:.0f} MiB)",
                    flush=True,
                )
    return runs


# -- the comparison --------------------------------------------------------------------------


def as_record(run: MailRun | DownloadRun) -> dict[str, Any]:
    """One run for --json: its measurements and the figures derived from them."""
    record = dataclasses.asdict(run)
    if isinstance(run, MailRun):
        latencies = record.pop("latencies")
        record.update(
            msg_per_s=run.msg_per_s,
            mb_per_s=run.mb_per_s,
            cpu_ms_per_message=run.cpu_ms_per_message,
            p50_ms=percentile(latencies, 0.5) * 1000 if latencies else None,
            p99_ms=percentile(latencies, 0.99) * 1000 if latencies else None,
        )
    else:
        record["mib_per_s"] = run.mib_per_s
    return record


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize_mail(workload: str, runs: dict[str, list[MailRun]]) -> None:
    """Medians per server, and per sealrelay the median of its round-by-round ratios to
    Postfix (each ratio from one round, where both ran under the same conditions)."""
    print(f"{workload}: medians over {len(runs['postfix'])} round(s)")
    for name, done in runs.items():
        line = (
            f"  {name:18} {median([r.msg_per_s for r in done]):.1f} msg/s,"
            f" {median([r.mb_per_s for r in done]):.1f} MB/s,"
            f" CPU {median([r.cpu_ms_per_message for r in done]):.2f} ms/msg"
            f" (load {median([r.load_ms_per_message for r in done]):.2f};"
            f" every core busy: {median([r.ceiling for r in done]):.0f} msg/s at most),"
            f" peak RSS {max(r.peak_rss for r in done) / MIB:.0f} MiB"
            f" (PSS {max(r.peak_pss for r in done) / MIB:.0f} MiB)"
        )
        latencies = [x for r in done for x in r.latencies]
        if latencies:
            line += (
                f", time to 250 p50 {ms(percentile(latencies, 0.5))}"
                f" p99 {ms(percentile(latencies, 0.99))}"
            )
        if workload == "paced":
            line += f", {sum(r.late for r in done)} started late"
        print(line)
    baselines = [name for name in runs if name.startswith("postfix")]
    for name, done in runs.items():
        if name in baselines:
            continue
        for baseline in baselines:
            print_ratio(name, done, baseline, runs[baseline], paced=workload == "paced")


def print_ratio(
    name: str, done: list[MailRun], baseline: str, base: list[MailRun], *, paced: bool = False
) -> None:
    """The median of the round-by-round ratios of `name` to `baseline`; `paced`: the two
    took the same offered load, so their times to 250 compare instead of their throughputs."""
    if paced:
        ours = percentile([x for r in done for x in r.latencies], 0.99)
        theirs = percentile([x for r in base for x in r.latencies], 0.99)
        first = f"time to 250 p99 {ms(ours)} against {ms(theirs)}"
    else:
        throughput = [s.msg_per_s / p.msg_per_s for s, p in zip(done, base, strict=True)]
        first = (
            f"throughput {median(throughput):.2f}x"
            f" (rounds {', '.join(f'{r:.2f}' for r in throughput)})"
        )
    # a short run can leave Postfix under one tick of the CPU clock (10 ms): no ratio then
    cpu = [
        s.cpu_ms_per_message / p.cpu_ms_per_message
        for s, p in zip(done, base, strict=True)
        if p.cpu_ms_per_message > 0
    ]
    print(
        f"  ratio {name} / {baseline}: {first},"
        + (
            f" CPU per message {median(cpu):.2f}x"
            if cpu
            else " CPU per message: not measured (Postfix's CPU was under a clock tick)"
        )
    )


def summarize_downloads(runs: dict[str, list[DownloadRun]]) -> None:
    (nginx, ours) = runs.values()
    name = list(runs)[1]
    print(f"downloads: medians over {len(nginx)} round(s)")
    for label, done in runs.items():
        print(
            f"  {label:18} {median([r.mib_per_s for r in done]):.0f} MiB/s,"
            f" server CPU {median([r.cpu_seconds for r in done]):.2f} s per round,"
            f" peak RSS {max(r.peak_rss for r in done) / MIB:.0f} MiB"
            f" (PSS {max(r.peak_pss for r in done) / MIB:.0f} MiB)"
        )
    ratios = [s.mib_per_s / n.mib_per_s for s, n in zip(ours, nginx, strict=True)]
    print(
        f"  ratio {name} / nginx: throughput {median(ratios):.2f}x"
        f" (rounds {', '.join(f'{r:.2f}' for r in ratios)})"
    )


def workload_line(
    workload: str, messages: int, size: int, sessions: int, probes: int, args: argparse.Namespace
) -> str:
    connections = "one connection each" if args.reuse_connections else "a new connection each"
    if workload == "paced":
        return (
            f"paced: {messages} messages of {size} B offered at {args.rate:g} a second, over at"
            f" most {sessions} sessions of this script's ({connections} message)"
        )
    return (
        f"{workload}: smtp-source -s {sessions} -m {messages} -l {size}"
        + (" -d" if args.reuse_connections else "")
        + (f", {probes} latency probe session(s) alongside" if probes else "")
    )


async def compare_mail(
    args: argparse.Namespace, workloads: list[str], record: dict[str, Any]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        directory = Path(tempfile.mkdtemp(prefix="sealrelay-compare-"))
        stack.callback(shutil.rmtree, directory, True)
        sink = SmtpSink(free_port())
        stack.push_async_callback(sink.stop)
        await sink.start()
        largest = max(args.size, args.big_size if "big" in workloads else 0)
        servers = [await start_postfix(directory, sink.port, stack)]
        if args.postfix_dkim:
            servers.append(await start_postfix(directory, sink.port, stack, signed=True))
        for backend in args.backends:
            relay = await start_sealrelay(
                backend, sink.port, largest, stack, processes=args.processes, prefill=args.prefill
            )
            servers.append(
                Server(relay.name, relay.trusted_port, relay.process.pid, relay.database_port)
            )
        if args.forwarder:
            servers.append(await start_forwarder(sink.port, stack))
        shapes = {
            "small": (args.messages, args.size, args.sessions, args.probes),
            "big": (args.big_messages, args.big_size, args.big_sessions, 0),
            "paced": (args.messages, args.size, args.sessions, 0),
        }
        for workload in workloads:
            messages, size, sessions, probes = shapes[workload]
            print(workload_line(workload, messages, size, sessions, probes, args), flush=True)
            runs: dict[str, list[MailRun]] = {s.name: [] for s in servers}
            for number in range(1, args.rounds + 1):
                for server in servers if number % 2 else reversed(servers):
                    if workload == "paced":
                        run = await paced_run(
                            server,
                            sink,
                            messages=messages,
                            size=size,
                            sessions=sessions,
                            rate=args.rate,
                            seconds=args.timeout,
                            reuse=args.reuse_connections,
                        )
                    else:
                        run = await mail_run(
                            server,
                            sink,
                            messages=messages,
                            size=size,
                            sessions=sessions,
                            probes=probes,
                            seconds=args.timeout,
                            reuse=args.reuse_connections,
                        )
                    runs[server.name].append(run)
                    print_mail_run(workload, number, run)
            summarize_mail(workload, runs)
            record[workload] = {name: [as_record(r) for r in done] for name, done in runs.items()}


async def compare(args: argparse.Namespace) -> int:
    workloads = args.workloads
    record: dict[str, Any] = {"arguments": {k: v for k, v in vars(args).items() if k != "json"}}
    print(
        f"compare: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start;"
        f" backends {', '.join(args.backends)}; {args.rounds} round(s); each sealrelay"
        + (
            f" database holding {args.prefill} delivered messages first"
            if args.prefill
            else " database new"
        ),
        flush=True,
    )
    try:
        for name in ("smtp-sink", "smtp-source", "postfix"):
            postfix_command(name)
        if args.postfix_dkim:
            opendkim_command()
        if "dl" in workloads:
            tool("nginx", "nginx")
        mail = [w for w in workloads if w != "dl"]
        if mail:
            await compare_mail(args, mail, record)
        if "dl" in workloads:
            downloads = await download_pair(args, args.backends[0])
            summarize_downloads(downloads)
            record["dl"] = {name: [as_record(r) for r in done] for name, done in downloads.items()}
    except (Missing, PostfixMissing, OpenDkimMissing) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    except Failed as exc:
        print(f"compare FAILED: {exc}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts, one round (CI smoke)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each pair (default 3)")
    parser.add_argument(
        "--backends",
        type=comma_separated(("sqlite", "postgres")),
        default=None,
        help="sealrelay databases, comma-separated: sqlite,postgres (default both; --quick:"
        " sqlite)",
    )
    parser.add_argument(
        "--workloads",
        type=comma_separated(("small", "big", "dl", "paced")),
        default="small,big,dl",
        help="comma-separated: small, big, dl, paced (small mail offered at --rate, not as"
        " fast as the server answers; not in the default)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=300,
        help="paced: messages offered a second (default 300)",
    )
    parser.add_argument("--messages", type=int, default=3000, help="small mail: how many")
    parser.add_argument("--size", type=int, default=5000, help="small mail: bytes (-l)")
    parser.add_argument("--sessions", type=int, default=20, help="small mail: smtp-source -s")
    parser.add_argument("--probes", type=int, default=2, help="latency probe sessions")
    parser.add_argument("--big-messages", type=int, default=200, help="10 MB mail: how many")
    parser.add_argument("--big-size", type=int, default=10 * MB, help="10 MB mail: bytes")
    parser.add_argument("--big-sessions", type=int, default=20, help="10 MB mail: sessions")
    parser.add_argument("--download-mib", type=int, default=100, help="linked file, MiB")
    parser.add_argument("--clients", type=int, default=10, help="parallel downloads")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run, at most")
    parser.add_argument(
        "--reuse-connections",
        action="store_true",
        help="smtp-source -d: many messages per connection (default: one, as smtp-source does)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="sealrelay serve --processes N",
    )
    parser.add_argument(
        "--postfix-dkim",
        action="store_true",
        help="also run a Postfix that signs with OpenDKIM as its milter, as sealrelay signs"
        " (the plain Postfix signs nothing)",
    )
    parser.add_argument(
        "--forwarder",
        action="store_true",
        help="also run bench/forwarder.py (aiosmtpd in, aiosmtplib out, nothing stored,"
        " signed or journaled) under the same mail load",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        default=10000,
        help="mail: delivered messages in each sealrelay database before the runs, as in"
        " service (bench/prefill.py; 0: a new database)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = parser.parse_args(argv)
    if args.prefill < 0:
        parser.error("--prefill: at least 0")
    if not args.rate > 0:
        parser.error("--rate: more than 0 messages a second")
    if args.quick:
        args.rounds = 1
        args.prefill = min(args.prefill, 40)
        args.messages, args.sessions, args.probes = 40, 4, 1
        args.big_messages, args.big_size, args.big_sessions = 4, 1 * MB, 2
        args.download_mib, args.clients = 5, 2
        args.timeout = min(args.timeout, 120)
    args.backends = args.backends or (["sqlite"] if args.quick else ["sqlite", "postgres"])
    return args


def main() -> None:
    sys.exit(asyncio.run(compare(parse())))


if __name__ == "__main__":
    main()
