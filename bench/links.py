"""Large attachments as links: a 25 MB attachment to 5 recipients, and downloads of a link.

    .venv/bin/python bench/links.py
    .venv/bin/python bench/links.py --messages 5 --attachment-mib 25 --download-mib 100 --rounds 3

It starts a real `sealrelay serve` process with the shipped policy (attachments over 2 MiB
become one personal link per recipient) and a sink in a child process, the same way as
bench/relay.py, whose helpers (bench/harness.py) it shares. Then:

1. Sends N messages, each with a 25 MiB PDF attachment (random bytes), to 5 external
   recipients over one SMTP session: time to 250 and until the sink has all 5 copies, the
   relay's peak RSS during that traffic (VmHWM, reset after the login) against the target
   3 x attachment + 100 MiB, and the size of each delivered copy.
2. Sends one message with a 100 MiB attachment, reads the link out of the delivered copy,
   the file's address out of the download page, and downloads the file with 10 parallel
   clients for R rounds from the relay and, for comparison, from a plain aiohttp
   `web.FileResponse` server in a subprocess serving the same blob file; aggregate MiB/s of
   each and their ratio, against the target "within 2x of FileResponse".

Exits 1 if a message was refused or lost, a copy was not turned into a link, or a download
came back short, failed, or (checked once per server, untimed) had the wrong sha256.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email
import email.policy
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    _MESSAGE_ID,
    AGENT,
    DOMAIN,
    RssSampler,
    add_agent,
    child_environment,
    database_url,
    free_port,
    open_sessions,
    percentile,
    reset_peak,
    sealrelay_command,
    tail,
    vm_hwm_kib,
    wait_ready,
    write_config,
)
from gateway.outbound.smtp_connection import stuffed_pieces  # noqa: E402

MIB = 1024 * 1024
KEEP_BELOW = 1 * MIB  # the sink passes on copies up to this size whole; a linked copy is tiny
TOKEN = r"[A-Za-z0-9_-]{43}"  # secrets.token_urlsafe(32)


# -- the sink, in its own process: which copy reached whom, and small copies whole ----------


class KeepingSink:
    """aiosmtpd handler: reports each copy's Message-ID, recipients, size, arrival and bytes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        arrived = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        data: bytes = envelope.original_content
        match = _MESSAGE_ID.search(data, 0, 65536)
        self.conn.send(
            (
                match.group(1).decode() if match else "",
                tuple(envelope.rcpt_tos),
                len(data),
                arrived,
                data if len(data) <= KEEP_BELOW else None,
            )
        )
        envelope.content = envelope.original_content = None
        return "250 2.0.0 Ok: kept"


def run_sink(port: int, conn: Connection) -> None:
    from aiosmtpd.smtp import SMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = KeepingSink(conn)

        def make() -> SMTP:
            return SMTP(handler, hostname="sink.bench", decode_data=False, data_size_limit=None)

        server = await loop.create_server(make, "127.0.0.1", port)
        conn.send("ready")
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@dataclass
class Copy:
    message_id: str
    recipient: str
    size: int
    arrived: float
    raw: bytes | None


@dataclass
class Inbox:
    """The copies the sink reported, in the bench process; `wait` until a condition holds."""

    copies: list[Copy] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(
        self,
        message_id: str,
        recipients: tuple[str, ...],
        size: int,
        arrived: float,
        raw: bytes | None,
    ) -> None:
        for recipient in recipients:
            self.copies.append(Copy(message_id, recipient, size, arrived, raw))
        self.changed.set()

    def of(self, message_id: str) -> list[Copy]:
        return [c for c in self.copies if c.message_id == message_id]

    async def wait(self, done: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True


@contextlib.contextmanager
def sink_process(port: int, inbox: Inbox, loop: asyncio.AbstractEventLoop) -> Iterator[int]:
    """Start the sink child; a reader thread feeds its reports into `inbox`. Yields its pid."""
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe(duplex=False)
    process = spawn.Process(target=run_sink, args=(port, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("the sink did not start")

        def read() -> None:
            with contextlib.suppress(EOFError, OSError):
                while True:
                    report = parent.recv()
                    loop.call_soon_threadsafe(inbox.add, *report)

        threading.Thread(target=read, daemon=True).start()
        assert process.pid is not None
        yield process.pid
    finally:
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        parent.close()


# -- the plain FileResponse server, in its own process --------------------------------------


def run_file_server(path: str, port: int, conn: Connection) -> None:
    from aiohttp import web

    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Content-Type": "application/pdf"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/file", serve)
        runner = web.AppRunner(app, access_log=None)  # as web/app.py runs the relay's site
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        conn.send("ready")
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@contextlib.contextmanager
def file_server_process(path: Path, port: int) -> Iterator[int]:
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe(duplex=False)
    process = spawn.Process(target=run_file_server, args=(str(path), port, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("the FileResponse server did not start")
        assert process.pid is not None
        yield process.pid
    finally:
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        parent.close()


# -- the messages ----------------------------------------------------------------------------


def make_attachment(size: int) -> bytes:
    """`size` bytes that start like a PDF and are random after that (they do not compress)."""
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    return head + os.urandom(size - len(head))


def make_message(
    message_id: str, recipients: list[str], subject: str, attachment: bytes, filename: str
) -> bytes:
    """A multipart/mixed mail: a quoted-printable text and the attachment in base64."""
    boundary = "=_bench_" + secrets.token_hex(8)
    header = (
        f"From: Anna Agent <{AGENT}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    )
    text = (
        "Guten Tag,\r\n\r\nanbei das Expos=C3=A9 zur Wohnung in der Musterstra=C3=9Fe.\r\n"
        "Mit freundlichen Gr=C3=BC=C3=9Fen\r\nAnna Agent\r\n"
    )
    head = (
        f"This is a MIME message.\r\n\r\n--{boundary}\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        f"{text}\r\n--{boundary}\r\n"
        f'Content-Type: application/pdf; name="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'
    )
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n").rstrip()
    end = f"\r\n--{boundary}--\r\n".encode()
    return (header + head).encode() + encoded + end


def stuffed(mail: bytes) -> bytes:
    """The DATA section as it goes on the wire: dot-stuffed as the relay's own upstream
    stuffs, and terminated.

    Done once before the clock starts: aiosmtplib's `sendmail` runs two regexes over the
    whole message first, about 0.55 s of CPU for a 34 MiB mail on this kind of machine,
    before it writes the first byte. A mail client on an agent's own computer does that
    (in C, if at all) on its own CPU, so it would only measure the bench's client.
    """
    assert b"\n" not in mail.replace(b"\r\n", b""), "the bench's mails use CRLF only"
    return b"".join(stuffed_pieces(mail)) + b".\r\n"


async def send_stuffed(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes
) -> None:
    """MAIL, RCPT and DATA with an already stuffed body, over aiosmtplib's connection."""
    await client.mail(sender)
    for recipient in recipients:
        await client.rcpt(recipient)
    reply = await client.execute_command(b"DATA")
    if reply.code != 354:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    assert client.protocol is not None
    client.protocol.write(data)
    reply = await client.protocol.read_response(timeout=client.timeout)
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)


def link_tokens(raw: bytes, public_url: str) -> list[str]:
    """The download tokens in a copy's text body (decoded: it may be quoted-printable)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    pattern = re.compile(re.escape(public_url.rstrip("/")) + rf"/d/({TOKEN})(?![A-Za-z0-9_-])")
    found: list[str] = []
    for part in message.walk():
        if part.get_content_type() == "text/plain" and not part.is_attachment():
            found += pattern.findall(part.get_content())
    return list(dict.fromkeys(found))


# -- downloads -------------------------------------------------------------------------------


@dataclass
class Round:
    seconds: float
    octets: int
    failures: list[str]


class DownloadFailed(Exception):
    pass


async def fetch(http: aiohttp.ClientSession, url: str, size: int, digest: Any = None) -> int:
    """GET `url`, streaming and discarding the body (or hashing it); its length, checked."""
    received = 0
    async with http.get(url) as response:
        if response.status != 200:
            raise DownloadFailed(f"HTTP {response.status}")
        if response.content_length != size:
            raise DownloadFailed(f"Content-Length {response.content_length}, want {size}")
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if digest is not None:
                digest.update(chunk)
    if received != size:
        raise DownloadFailed(f"short: {received} of {size} bytes")
    return received


async def one_round(clients: list[aiohttp.ClientSession], url: str, size: int) -> Round:
    began = time.monotonic()
    outcomes = await asyncio.gather(
        *(fetch(http, url, size) for http in clients), return_exceptions=True
    )
    seconds = time.monotonic() - began
    failures = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    octets = sum(o for o in outcomes if isinstance(o, int))
    return Round(seconds, octets, failures)


async def verify(http: aiohttp.ClientSession, url: str, size: int, sha256: str) -> str | None:
    """One whole download, hashed (untimed); what is wrong with it, or None."""
    digest = hashlib.sha256()
    try:
        await fetch(http, url, size, digest)
    except (DownloadFailed, aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if digest.hexdigest() != sha256:
        return f"sha256 {digest.hexdigest()}, want {sha256}"
    return None


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return float(sum(psutil.Process(pid).cpu_times()[:2]))
    return float("nan")


def own_cpu_seconds() -> float:
    return float(sum(os.times()[:2]))


# -- the run ---------------------------------------------------------------------------------


class Failed(Exception):
    """Something that makes the figures meaningless; the bench stops and exits 1."""


async def bench(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="sealrelay-bench-links-"))
    loop = asyncio.get_running_loop()
    inbox = Inbox()
    smtp_port, web_port, sink_port = free_port(), free_port(), free_port()
    log = directory / "relay.log"
    # max_message_size = 2 x the largest message: room for the 100 MiB download's mail
    largest = max(args.attachment_mib, args.download_mib) * MIB * 4 // 3 + MIB
    try:
        async with database_url(args.backend, directory) as db_url:
            config = write_config(
                directory, db_url, (smtp_port, web_port, sink_port), largest, links=True
            )
            await asyncio.to_thread(add_agent, config)
            with sink_process(sink_port, inbox, loop) as sink_pid, log.open("wb") as out:
                profile = ("-m", "cProfile", "-o", str(args.profile)) if args.profile else ()
                relay = await asyncio.create_subprocess_exec(
                    *((sys.executable, *profile) if profile else ()),
                    sealrelay_command(),
                    "serve",
                    "--config",
                    str(config),
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=child_environment(),
                )
                try:
                    run = Run(args, relay.pid, smtp_port, web_port, directory, inbox, sink_pid)
                    await wait_ready(relay, web_port, log)
                    return await run.measure()
                except Failed as exc:
                    print(f"FAILED: {exc}\n--- relay.log (tail)\n{tail(log)}", file=sys.stderr)
                    return 1
                finally:
                    if relay.returncode is None:
                        relay.terminate()
                    try:
                        await asyncio.wait_for(relay.wait(), 15)
                    except TimeoutError:
                        relay.kill()
                        await relay.wait()
    finally:
        if args.keep:
            print(f"kept {directory} (config, relay.log, database, blobs)")
        else:
            shutil.rmtree(directory, ignore_errors=True)


class Run:
    def __init__(
        self,
        args: argparse.Namespace,
        relay_pid: int,
        smtp_port: int,
        web_port: int,
        directory: Path,
        inbox: Inbox,
        sink_pid: int,
    ) -> None:
        self.args = args
        self.relay_pid = relay_pid
        self.smtp_port = smtp_port
        self.public_url = f"http://127.0.0.1:{web_port}"
        self.directory = directory
        self.inbox = inbox
        self.sink_pid = sink_pid
        self.tag = secrets.token_hex(4)
        self.figures: dict[str, Any] = {}
        self.problems: list[str] = []

    async def measure(self) -> int:
        self.figures["load_average_at_start"] = round(os.getloadavg()[0], 2)
        self.figures["rss_start_mib"] = mib(psutil.Process(self.relay_pid).memory_info().rss)
        (client,) = await open_sessions(1, self.smtp_port)
        try:
            self.figures["peak_rss_login_mib"] = mib_k(vm_hwm_kib(self.relay_pid))
            await self.attachments(client)
            if not self.args.no_download:
                try:
                    await self.downloads(client)
                except Failed as exc:
                    self.problems.append(f"download part: {exc}")
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
        print_report(self.figures, self.args)
        for problem in self.problems:
            print(f"  PROBLEM       {problem}")
        if self.args.json:
            print(json.dumps({**self.figures, "problems": self.problems}))
        return 1 if self.problems else 0

    # -- 1: N x 25 MiB to 5 recipients over one session

    async def attachments(self, client: aiosmtplib.SMTP) -> None:
        args, f = self.args, self.figures
        recipients = [f"prospect{i}@example.com" for i in range(1, args.recipients + 1)]
        attachment = make_attachment(args.attachment_mib * MIB)
        mails = [
            make_message(
                f"<links-{self.tag}-{n}@{DOMAIN}>",
                recipients,
                f"Expose {n}",
                attachment,
                "expose.pdf",
            )
            for n in range(args.messages)
        ]
        del attachment
        f["message_mib"] = round(len(mails[0]) / MIB, 1)
        mails = [stuffed(mail) for mail in mails]

        was_reset = reset_peak(self.relay_pid)
        before = psutil.Process(self.relay_pid).memory_info().rss
        sampler = RssSampler(self.relay_pid)
        sampler.start()
        cpu_before = cpu_seconds(self.relay_pid)
        own_before = own_cpu_seconds()
        sent: list[tuple[str, float, float]] = []  # Message-ID, MAIL FROM, 250
        refused: list[str] = []
        for n, mail in enumerate(mails):
            message_id = f"<links-{self.tag}-{n}@{DOMAIN}>"
            began = time.monotonic()
            try:
                await send_stuffed(client, AGENT, recipients, mail)
            except aiosmtplib.SMTPResponseException as exc:
                refused.append(f"{message_id}: {exc.code} {exc.message}")
                continue
            sent.append((message_id, began, time.monotonic()))
        own_cpu = own_cpu_seconds() - own_before
        del mails

        wanted = {(mid, r) for mid, _, _ in sent for r in recipients}

        def all_in() -> bool:
            return wanted <= {(c.message_id, c.recipient) for c in self.inbox.copies}

        await self.inbox.wait(all_in, self.args.timeout)
        await asyncio.sleep(0.3)  # late duplicates, if any, still count
        await sampler.stop()
        traffic_hwm = vm_hwm_kib(self.relay_pid) if was_reset else None

        to_250 = [done - began for _, began, done in sent]
        to_all: list[float] = []
        copies: list[Copy] = []
        for message_id, began, _ in sent:
            got = self.inbox.of(message_id)
            copies += got
            if {c.recipient for c in got} >= set(recipients):
                to_all.append(max(c.arrived for c in got) - began)
        lost = sorted(wanted - {(c.message_id, c.recipient) for c in copies})
        tokens = [link_tokens(c.raw, self.public_url) if c.raw else [] for c in copies]
        sizes = [c.size for c in copies]
        target = 3 * args.attachment_mib + 100
        f.update(
            messages=args.messages,
            recipients=args.recipients,
            attachment_mib=args.attachment_mib,
            accepted=len(sent),
            refused=len(refused),
            copies=len(copies),
            lost=len(lost),
            to_250_p50_s=round(percentile(to_250, 0.5), 3),
            to_250_max_s=round(max(to_250, default=float("nan")), 3),
            to_all_copies_p50_s=round(percentile(to_all, 0.5), 3),
            to_all_copies_max_s=round(max(to_all, default=float("nan")), 3),
            copy_bytes_min=min(sizes, default=0),
            copy_bytes_max=max(sizes, default=0),
            copies_with_one_link=sum(1 for t in tokens if len(t) == 1),
            distinct_tokens=len({t[0] for t in tokens if len(t) == 1}),
            rss_before_traffic_mib=mib(before),
            peak_rss_traffic_mib=mib_k(traffic_hwm),
            peak_rss_sampled_mib=mib(sampler.peak),
            rss_target_mib=target,
            rss_target_met=traffic_hwm is not None and traffic_hwm / 1024 < target,
            cpu_relay_mail_s=round(cpu_seconds(self.relay_pid) - cpu_before, 2),
            cpu_client_send_s=round(own_cpu, 2),
        )
        if refused:
            self.problems.append(f"refused: {refused[:3]}")
        if lost:
            self.problems.append(f"{len(lost)} copies never reached the sink: {lost[:3]}")
        if any(size > KEEP_BELOW for size in sizes):
            self.problems.append("a copy still carries the attachment (over 1 MiB)")
        if f["copies_with_one_link"] != len(copies) or f["distinct_tokens"] != len(copies):
            self.problems.append(
                f"{f['copies_with_one_link']} of {len(copies)} copies had exactly one link,"
                f" {f['distinct_tokens']} distinct tokens (want one personal link per copy)"
            )

    # -- 2: a 100 MiB file behind a link, downloaded in parallel

    async def downloads(self, client: aiosmtplib.SMTP) -> None:
        args, f = self.args, self.figures
        size = args.download_mib * MIB
        attachment = make_attachment(size)
        sha256 = hashlib.sha256(attachment).hexdigest()
        message_id = f"<links-{self.tag}-big@{DOMAIN}>"
        mail = make_message(message_id, ["downloader@example.com"], "Big", attachment, "big.pdf")
        del attachment
        was_reset = reset_peak(self.relay_pid)
        began = time.monotonic()
        try:
            await client.sendmail(AGENT, ["downloader@example.com"], mail)
        except aiosmtplib.SMTPResponseException as exc:
            raise Failed(f"the {args.download_mib} MiB mail was refused: {exc}") from exc
        f["big_mail_to_250_s"] = round(time.monotonic() - began, 2)
        f["big_mail_mib"] = round(len(mail) / MIB, 1)
        del mail
        if not await self.inbox.wait(lambda: bool(self.inbox.of(message_id)), args.timeout):
            raise Failed(f"the {args.download_mib} MiB mail's copy never reached the sink")
        f["peak_rss_big_mail_mib"] = mib_k(vm_hwm_kib(self.relay_pid)) if was_reset else None

        copy = self.inbox.of(message_id)[0]
        if copy.raw is None:
            raise Failed(f"the copy is {copy.size} bytes: the attachment was not linked")
        tokens = link_tokens(copy.raw, self.public_url)
        if len(tokens) != 1:
            raise Failed(f"want one link in the copy's text, found {tokens}")
        page_url = f"{self.public_url}/d/{tokens[0]}"

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        clients = [
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1))
            for _ in range(args.clients)
        ]
        try:
            async with clients[0].get(page_url) as response:
                html = await response.text()
                if response.status != 200:
                    raise Failed(f"GET {page_url}: HTTP {response.status}")
            hrefs = re.findall(rf'href="(/d/{re.escape(tokens[0])}/f/[^"]+)"', html)
            if len(hrefs) != 1:
                raise Failed(f"want one file link on the download page, found {hrefs}")
            blob = self.directory / "blobs" / sha256[:2] / sha256[2:4] / sha256
            if not blob.is_file() or blob.stat().st_size != size:
                raise Failed(f"the attachment's blob is not at {blob}")
            plain_port = free_port()
            with file_server_process(blob, plain_port) as plain_pid:
                servers = {
                    "sealrelay": (f"{self.public_url}{hrefs[0]}", self.relay_pid),
                    "fileresponse": (f"http://127.0.0.1:{plain_port}/file", plain_pid),
                }
                await self.race(servers, clients, size, sha256)
        finally:
            await asyncio.gather(*(http.close() for http in clients))

    async def race(
        self,
        servers: dict[str, tuple[str, int]],
        clients: list[aiohttp.ClientSession],
        size: int,
        sha256: str,
    ) -> None:
        """Per server: one hashed download (untimed, it also warms the page cache), then
        rounds of all clients at once, the servers taking turns round by round."""
        args, f = self.args, self.figures
        for name, (url, _) in servers.items():
            wrong = await verify(clients[0], url, size, sha256)
            if wrong:
                self.problems.append(f"{name}: the verifying download failed: {wrong}")
        rounds: dict[str, list[Round]] = {name: [] for name in servers}
        cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
        client_cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
        was_reset = reset_peak(self.relay_pid)
        for _ in range(args.rounds):
            for name, (url, pid) in servers.items():
                server_before, own_before = cpu_seconds(pid), own_cpu_seconds()
                result = await one_round(clients, url, size)
                cpu[name] += cpu_seconds(pid) - server_before
                client_cpu[name] += own_cpu_seconds() - own_before
                rounds[name].append(result)
                if result.failures:
                    self.problems.append(f"{name}: {result.failures[:3]}")
        f["peak_rss_downloads_mib"] = mib_k(vm_hwm_kib(self.relay_pid)) if was_reset else None
        f.update(download_mib=args.download_mib, clients=args.clients, rounds=args.rounds)
        for name, done in rounds.items():
            seconds = sum(r.seconds for r in done)
            octets = sum(r.octets for r in done)
            f[f"{name}_mib_s"] = round(octets / MIB / seconds, 1) if seconds else 0.0
            f[f"{name}_round_mib_s"] = [round(r.octets / MIB / r.seconds, 1) for r in done]
            f[f"cpu_{name}_s"] = round(cpu[name], 1)
            f[f"cpu_clients_{name}_s"] = round(client_cpu[name], 1)
        plain = f["fileresponse_mib_s"]
        f["download_ratio"] = (
            round(plain / f["sealrelay_mib_s"], 2) if f["sealrelay_mib_s"] else None
        )
        f["download_target_met"] = f["download_ratio"] is not None and f["download_ratio"] <= 2


def mib(octets: int) -> float:
    return round(octets / MIB, 1)


def mib_k(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def print_report(f: dict[str, Any], args: argparse.Namespace) -> None:
    met = {True: "met", False: "MISSED"}
    print(
        f"sealrelay links bench: {f['messages']} x {f['attachment_mib']} MiB attachment"
        f" ({f['message_mib']} MiB mail) to {f['recipients']} recipients over one session"
        f" ({args.backend}; load average {f['load_average_at_start']} at start)"
    )
    print(
        f"  accepted      {f['accepted']}, refused {f['refused']};"
        f" copies at the sink {f['copies']}, lost {f['lost']}"
    )
    print(
        f"  time to 250   p50 {f['to_250_p50_s']} s, max {f['to_250_max_s']} s;"
        f" target < 1 s: {met[f['to_250_max_s'] < 1]}"
    )
    print(
        f"  all copies in p50 {f['to_all_copies_p50_s']} s, max {f['to_all_copies_max_s']} s"
        " (MAIL FROM until the sink had every recipient's copy)"
    )
    print(
        f"  copy size     {f['copy_bytes_min']}..{f['copy_bytes_max']} bytes;"
        f" {f['copies_with_one_link']} copies with one link, {f['distinct_tokens']} distinct"
    )
    print(
        f"  relay RSS     {f['rss_start_mib']} MiB when ready, {f['peak_rss_login_mib']} MiB"
        f" peak through the login, {f['rss_before_traffic_mib']} MiB before the mail"
    )
    print(
        f"  peak RSS      {f['peak_rss_traffic_mib']} MiB during the mail (VmHWM; sampled"
        f" {f['peak_rss_sampled_mib']} MiB); target < {f['rss_target_mib']} MiB"
        f" (3 x attachment + 100 MiB): {met[f['rss_target_met']]}"
    )
    print(
        f"  CPU           relay {f['cpu_relay_mail_s']} s for the mail; the bench's client"
        f" {f['cpu_client_send_s']} s sending it (the body stuffed beforehand, untimed)"
    )
    if "sealrelay_mib_s" not in f:
        return
    print(
        f"downloads: {f['download_mib']} MiB file behind a link ({f['big_mail_mib']} MiB mail:"
        f" 250 after {f['big_mail_to_250_s']} s, relay peak RSS {f['peak_rss_big_mail_mib']}"
        f" MiB), {f['clients']} parallel clients x {f['rounds']} rounds"
    )
    for name, label in (("sealrelay", "sealrelay   "), ("fileresponse", "FileResponse")):
        print(
            f"  {label}  {f[f'{name}_mib_s']} MiB/s (rounds {f[f'{name}_round_mib_s']});"
            f" CPU s: server {f[f'cpu_{name}_s']}, clients {f[f'cpu_clients_{name}_s']}"
        )
    print(
        f"  ratio         FileResponse / sealrelay = {f['download_ratio']};"
        f" target <= 2: {met[f['download_target_met']]};"
        f" relay peak RSS during downloads {f['peak_rss_downloads_mib']} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=5, help="mails with the attachment (N)")
    parser.add_argument("--recipients", type=int, default=5, help="external recipients per mail")
    parser.add_argument("--attachment-mib", type=int, default=25, help="attachment size, MiB")
    parser.add_argument("--download-mib", type=int, default=100, help="linked file size, MiB")
    parser.add_argument("--clients", type=int, default=10, help="parallel download clients")
    parser.add_argument("--rounds", type=int, default=3, help="download rounds per server (R)")
    parser.add_argument("--no-download", action="store_true", help="only the mail part")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for delivery")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the relay under cProfile and write its stats to this file",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    sys.exit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
