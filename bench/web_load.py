"""Prospects on the relay's web side at a steady rate: page views and downloads, by schedule.

Request n starts at t0 + n / rate on the loop's clock, whatever the answers before it took
(an open loop, as visitors arrive: a slow relay does not slow them down), and its time runs
from that scheduled start to the last byte of the answer, so a request the client itself
started late is not flattered. The load runs in a child process of its own, so that its HTTP
work does not share an event loop with the SMTP clients whose time to 250 is measured beside
it. A browser's user agent, so the relay counts the visits as a person's (rules/
automated_visits.py): each is journaled as a view or a download.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

DRAIN = 10.0  # seconds the answers still under way get once the load ends; then errors
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


@dataclass(frozen=True)
class Target:
    """One address a prospect asks for; `size`: the length a file's answer must have."""

    kind: str
    url: str
    size: int | None = None


@dataclass
class Outcome:
    """What the load did: per kind the times of the answers that were right, and the rest."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    asked: dict[str, int] = field(default_factory=dict)  # requests started, per kind
    sent: int = 0
    seconds: float = 0.0  # the first scheduled start to the end of the schedule
    late_max: float = 0.0  # the furthest a start fell behind its schedule
    cpu_seconds: float = 0.0  # the load's own process

    @property
    def answered(self) -> int:
        return sum(len(times) for times in self.latencies.values())


async def fetch(http: aiohttp.ClientSession, target: Target, due: float, outcome: Outcome) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with http.get(target.url) as response:
            received = 0
            async for chunk in response.content.iter_any():
                received += len(chunk)
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            if target.size is not None and received != target.size:
                raise ValueError(f"{received} bytes, want {target.size}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.errors.append(f"{target.kind}: {type(exc).__name__}: {exc}")
        return
    outcome.latencies.setdefault(target.kind, []).append(loop.time() - due)


async def paced(targets: list[Target], rate: float, stop: asyncio.Event) -> Outcome:
    """Requests to `targets` in turn, `rate` a second, until `stop`; then the last answers."""
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    pending: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)  # visitors do not queue behind each other
    async with aiohttp.ClientSession(
        headers={"User-Agent": BROWSER}, timeout=timeout, connector=connector
    ) as http:
        start = loop.time()
        while not stop.is_set():
            due = start + outcome.sent / rate
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)  # the schedule, not a pause: it cannot drift
                continue
            outcome.late_max = max(outcome.late_max, loop.time() - due)
            target = targets[outcome.sent % len(targets)]
            outcome.asked[target.kind] = outcome.asked.get(target.kind, 0) + 1
            task = asyncio.create_task(fetch(http, target, due, outcome))
            pending.add(task)
            task.add_done_callback(pending.discard)
            outcome.sent += 1
        outcome.seconds = loop.time() - start
        if pending:
            _, late = await asyncio.wait(set(pending), timeout=DRAIN)
            for task in late:
                task.cancel()
            outcome.errors += ["unanswered when the load ended"] * len(late)
    return outcome


def run_child(targets: list[Target], rate: float, conn: Connection) -> None:
    """The child: load from start until the parent sends anything, then the outcome back."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wait_for_parent() -> None:
            with contextlib.suppress(EOFError, OSError):
                conn.recv()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_parent, daemon=True).start()
        conn.send("started")
        outcome = await paced(targets, rate, stop)
        outcome.cpu_seconds = sum(os.times()[:2])
        conn.send(dataclasses.asdict(outcome))

    asyncio.run(main())


class WebLoad:
    """The paced load in a child process: `start` until it runs, `stop` for its outcome."""

    def __init__(self, targets: list[Target], rate: float) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe(duplex=True)
        self.process = spawn.Process(target=run_child, args=(targets, rate, child), daemon=True)
        self._child = child

    async def start(self) -> None:
        self.process.start()
        self._child.close()
        started = await asyncio.to_thread(self.conn.poll, 60)
        if not started or self.conn.recv() != "started":
            self.kill()
            raise RuntimeError("the web load did not start")

    async def stop(self, seconds: float = 120) -> Outcome:
        self.conn.send("stop")
        try:
            if not await asyncio.to_thread(self.conn.poll, seconds):
                raise RuntimeError(f"the web load did not end within {seconds} s")
            fields: dict[str, Any] = self.conn.recv()
        finally:
            self.kill()
        return Outcome(**fields)

    def kill(self) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
