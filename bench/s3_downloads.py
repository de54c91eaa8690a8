"""Downloads from the S3 blob store against the local one: a file to parallel clients.

    .venv/bin/python bench/s3_downloads.py
    .venv/bin/python bench/s3_downloads.py --mib 100 --clients 10 --rounds 3

Stores one random `--mib` MiB blob in a LocalBlobStore and in an S3BlobStore whose bucket is
moto's S3 server (`python -m moto.server`, its own process, loopback). For each store a web
server process sends the blob the way the relay's download handler does
(`web.blobs.send_blob`: sendfile from a local file, a streamed ranged GET from S3), and
`--clients` parallel clients fetch it whole, `--rounds` times, local and S3 interleaved.
Prints each round's aggregate MiB/s and the web server's CPU seconds, then the medians and
their ratio.

What it measures: the relay's streaming path from each store. It leaves out the link lookup
and the journal (bench/links.py has those) and, for S3, the figure is bounded by moto, a
Python server, far slower than AWS, MinIO or Garage: it is a floor, not a forecast.
Exits 1 when a download comes back short or with the wrong sha256.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import free_port  # noqa: E402
from gateway.store.blobs import BlobStore  # noqa: E402
from gateway.store.local_blobs import LocalBlobStore  # noqa: E402
from gateway.store.s3_blobs import S3BlobStore  # noqa: E402
from web.blobs import send_blob  # noqa: E402

MIB = 1024 * 1024
BUCKET = "bench"


def s3_store(endpoint_url: str) -> S3BlobStore:
    return S3BlobStore(
        BUCKET,
        "blobs",
        endpoint_url=endpoint_url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="bench",
        secret_access_key="bench",
    )


def make_store(kind: str, directory: Path, endpoint_url: str) -> BlobStore:
    return LocalBlobStore(directory / "blobs") if kind == "local" else s3_store(endpoint_url)


def run_web_server(
    kind: str, directory: str, endpoint_url: str, port: int, conn: Connection
) -> None:
    """The download path of the relay's web, alone: open the blob, send it."""

    async def main() -> None:
        store = make_store(kind, Path(directory), endpoint_url)

        async def download(request: web.Request) -> web.StreamResponse:
            async with store.open(request.match_info["digest"]) as blob:
                response = web.StreamResponse()
                response.content_length = blob.size
                response.content_type = "application/octet-stream"
                await response.prepare(request)
                await send_blob(request, response, blob, 0, blob.size)
                await response.write_eof()
                return response

        app = web.Application()
        app.router.add_get("/b/{digest}", download)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        conn.send("ready")
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def web_server(kind: str, directory: Path, endpoint_url: str) -> Iterator[tuple[int, int]]:
    port = free_port()
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=run_web_server, args=(kind, str(directory), endpoint_url, port, child), daemon=True
    )
    process.start()
    try:
        if not parent.poll(30):
            raise RuntimeError(f"the {kind} web server did not start")
        parent.recv()
        assert process.pid is not None
        yield port, process.pid
    finally:
        process.terminate()
        process.join(10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


async def wait_for_s3(endpoint_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(endpoint_url):
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


async def fetch(http: aiohttp.ClientSession, url: str, digest: str | None) -> int:
    hasher = hashlib.sha256() if digest else None
    received = 0
    async with http.get(url) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    if hasher is not None and hasher.hexdigest() != digest:
        raise RuntimeError(f"{url}: wrong sha256")
    return received


async def one_round(url: str, clients: int, size: int) -> float:
    """Aggregate MiB/s of `clients` parallel downloads of the whole file."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    sessions = [aiohttp.ClientSession(timeout=timeout) for _ in range(clients)]
    try:
        began = time.monotonic()
        sizes = await asyncio.gather(*(fetch(http, url, None) for http in sessions))
        elapsed = time.monotonic() - began
    finally:
        await asyncio.gather(*(http.close() for http in sessions))
    if any(got != size for got in sizes):
        raise RuntimeError(f"short download: {sizes}")
    return clients * size / MIB / elapsed


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def bench(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="sealrelay-bench-s3-"))
    data = os.urandom(args.mib * MIB)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with moto_server() as endpoint_url:
            await wait_for_s3(endpoint_url)
            async with (
                aiohttp.ClientSession() as http,
                http.put(f"{endpoint_url}/{BUCKET}") as made,
            ):
                made.raise_for_status()
            for kind in ("local", "s3"):
                store = make_store(kind, directory, endpoint_url)
                began = time.monotonic()
                assert await store.put(data) == digest
                print(f"put {args.mib} MiB into {kind}: {time.monotonic() - began:.2f} s")
                await store.close()
            del data
            results: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
            with (
                web_server("local", directory, endpoint_url) as (local_port, local_pid),
                web_server("s3", directory, endpoint_url) as (s3_port, s3_pid),
            ):
                servers = {"local": (local_port, local_pid), "s3": (s3_port, s3_pid)}
                async with aiohttp.ClientSession() as http:
                    for port, _ in servers.values():  # once, untimed, checked
                        await fetch(http, f"http://127.0.0.1:{port}/b/{digest}", digest)
                for number in range(1, args.rounds + 1):
                    for kind, (port, pid) in servers.items():
                        cpu = cpu_seconds(pid)
                        url = f"http://127.0.0.1:{port}/b/{digest}"
                        rate = await one_round(url, args.clients, args.mib * MIB)
                        used = cpu_seconds(pid) - cpu
                        results[kind].append((rate, used))
                        print(
                            f"round {number} {kind:5}: {rate:8.0f} MiB/s"
                            f" ({args.clients} x {args.mib} MiB), web server CPU {used:.2f} s"
                        )
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    local = statistics.median(rate for rate, _ in results["local"])
    s3 = statistics.median(rate for rate, _ in results["s3"])
    local_cpu = statistics.median(cpu for _, cpu in results["local"])
    s3_cpu = statistics.median(cpu for _, cpu in results["s3"])
    gib = args.clients * args.mib / 1024
    print(f"medians over {args.rounds} round(s), {args.clients} clients x {args.mib} MiB:")
    print(f"  local (sendfile)        {local:8.0f} MiB/s   web CPU {local_cpu / gib:.2f} s/GiB")
    print(f"  s3 via moto (streamed)  {s3:8.0f} MiB/s   web CPU {s3_cpu / gib:.2f} s/GiB")
    print(f"  s3 / local              {s3 / local:8.2f}x")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="size of the file")
    parser.add_argument("--clients", type=int, default=10, help="parallel downloads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    sys.exit(asyncio.run(bench(parser.parse_args())))


if __name__ == "__main__":
    main()
