"""CPU per copy sent upstream: a new connection each, kept, pipelined, pipelined with BDAT.

    .venv/bin/python bench/upstream.py --copies 2000 --size 5000
    .venv/bin/python bench/upstream.py --copies 2000 --size 5000 --uvloop
    .venv/bin/python bench/upstream.py --copies 400 --rtt 20 --ways pipelined,chunked

The relay's own upstream code (gateway/outbound/upstream.py, SmtpUpstream) sends `--copies`
copies of about `--size` bytes to an aiosmtpd sink in a child process of its own, which offers
PIPELINING and CHUNKING and throws the bodies away, once per way of sending:

- **new**: `connection_cache = 0`, a connection per copy (what the relay did before);
- **kept**: kept connections, `pipelining = false` (RSET, MAIL, RCPT, DATA one at a time);
- **pipelined**: kept connections with PIPELINING (RSET, MAIL, RCPT and DATA in one write);
- **chunked**: pipelined, and the copy as one BDAT chunk (CHUNKING), not dot-stuffed.

`--concurrency` copies are in flight at a time (default 4). For each it prints the CPU time
of this process (the sending side only: user + system) per copy, the copies per second, and
how many connections the sink saw.

`--rtt MS` puts a round trip of that many milliseconds between the two (a proxy in the sink's
process holds every piece half of it each way), as to Microsoft 365 or Gmail over the
internet: the copies per second then count round trips per copy more than CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, where bench/dkim.py would
# stand in for dkimpy.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

from bench.options import comma_separated  # noqa: E402
from gateway.config import UpstreamSettings  # noqa: E402
from gateway.outbound.upstream import SmtpUpstream  # noqa: E402
from sealrelay.serve import event_loop  # noqa: E402

WAYS = {
    "new": {"connection_cache": 0, "chunking": False},
    "kept": {"pipelining": False, "chunking": False},
    "pipelined": {"chunking": False},
    "chunked": {},
}


class _Sink:
    """aiosmtpd handler: offers PIPELINING and CHUNKING, counts connections, keeps no body."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.connections += 1
        return [*responses[:-1], "250-PIPELINING", "250-CHUNKING", responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        envelope.content = envelope.original_content = None
        return "250 2.0.0 Ok: counted"


async def _delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """What `reader` gets, written to `writer` `delay` seconds after it came, in order."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while data := await reader.read(65536):
            pieces.put_nowait((loop.time() + delay, data))
        pieces.put_nowait((loop.time() + delay, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, data = await pieces.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        writer.close()


async def _latency_proxy(port: int, target: int, rtt: float) -> asyncio.Server:
    """A listener on `port` passing connections on to `target`, half of `rtt` each way."""

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            _delayed(reader, upstream_writer, rtt / 2),
            _delayed(upstream_reader, writer, rtt / 2),
            return_exceptions=True,
        )

    return await asyncio.start_server(connected, "127.0.0.1", port)


def run_sink(port: int, rtt: float, conn: Connection) -> None:
    """The sink's process: answers each request on `conn` with the connections so far."""
    from aiosmtpd.smtp import SMTP

    from tests.chunking_smtp import ChunkingSMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = _Sink()

        def make() -> SMTP:
            return ChunkingSMTP(
                handler, hostname="sink.bench", decode_data=False, data_size_limit=None
            )

        target = free_port() if rtt else port
        listening = [await loop.create_server(make, "127.0.0.1", target)]
        if rtt:
            listening.append(await _latency_proxy(port, target, rtt))
        conn.send("ready")
        while listening:  # until the process is ended
            await asyncio.to_thread(conn.recv)
            conn.send(handler.connections)

    with contextlib.suppress(KeyboardInterrupt, EOFError):
        asyncio.run(main())


@contextlib.contextmanager
def sink(port: int, rtt: float) -> Iterator[Callable[[], int]]:
    """The sink process; yields a function that says how many connections it saw."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_sink, args=(port, rtt, child), daemon=True)
    process.start()
    if not parent.poll(30) or parent.recv() != "ready":
        process.kill()
        raise RuntimeError("the sink did not start")

    def connections() -> int:
        parent.send("count")
        return int(parent.recv())

    try:
        yield connections
    finally:
        process.terminate()
        process.join(5)


def message(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    head = b"From: agent@bench.example\r\nTo: prospect@example.com\r\nSubject: bench\r\n\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def one_way(port: int, way: str, copies: int, concurrency: int, data: bytes) -> float:
    """Send the copies one way; the CPU seconds this process spent on them."""
    settings = UpstreamSettings(url=f"smtp://127.0.0.1:{port}", **WAYS[way])
    upstream = SmtpUpstream(settings, "relay.bench.example")
    left = iter(range(copies))

    async def sender() -> None:
        for _ in left:
            outcomes = await upstream.send("agent@bench.example", ["p@example.com"], data)
            [outcome] = outcomes.values()
            if not outcome.delivered:
                raise RuntimeError(f"not delivered: {outcome.error}")

    started = time.process_time()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    await upstream.close()
    return time.process_time() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--copies", type=int, default=2000)
    parser.add_argument("--size", type=int, default=5000, help="bytes per copy, about")
    parser.add_argument("--concurrency", type=int, default=4, help="copies in flight at once")
    parser.add_argument(
        "--ways",
        type=comma_separated(WAYS),
        default=",".join(WAYS),
        help=f"comma-separated: {', '.join(WAYS)}",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (installed)")
    parser.add_argument("--rtt", type=float, default=0, help="round-trip time to the sink, ms")
    args = parser.parse_args()
    factory, name = event_loop() if args.uvloop else (asyncio.new_event_loop, "asyncio")
    data = message(args.size)
    port = free_port()
    print(
        f"upstream bench: {args.copies} copies of {len(data)} B, {args.concurrency} at a time,"
        f" event loop {name}, round trip {args.rtt:g} ms,"
        f" load average {os.getloadavg()[0]:.2f} at start"
    )
    with sink(port, args.rtt / 1000) as connections:
        for way in args.ways:
            before = connections()
            wall = time.perf_counter()
            with asyncio.Runner(loop_factory=factory) as runner:
                cpu = runner.run(one_way(port, way, args.copies, args.concurrency, data))
            wall = time.perf_counter() - wall
            print(
                f"  {way:<10} CPU {cpu / args.copies * 1000:.2f} ms per copy,"
                f" {args.copies / wall:.0f} copies/s, {connections() - before} connections"
            )


if __name__ == "__main__":
    main()
