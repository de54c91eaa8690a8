"""Password guessing against the SMTP front, and what an agent's login costs meanwhile.

    .venv/bin/python bench/auth_flood.py
    .venv/bin/python bench/auth_flood.py --attackers 200 --seconds 20 --spread one

A real `sealrelay serve` process (SQLite in a temp directory, plaintext AUTH on loopback)
with one agent. First the agent logs in alone, then while ATTACKERS clients guess
passwords in a loop (connect, EHLO, AUTH PLAIN until refused, reconnect), each from its own
address in 127.0.0.0/8 (`--spread many`) or all from one (`--spread one`); the agent logs
in from 127.0.0.1 twice a second throughout. Prints the agent's login time (p50, max) alone
and under the flood, and how many guesses per second were checked (535) against refused
without a check (454 at AUTH, 421 at connect or after three failures).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEALRELAY = str(Path(sys.executable).parent / "sealrelay")
AGENT = "agent@bench.example"
PASSWORD = "bench password 2026"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if not line:
            return 0
        if line[3:4] != b"-":
            return int(line[:3])


async def login_time(port: int) -> Phases:
    """Seconds to connect, to the greeting, and from AUTH to 235."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connected = time.perf_counter()
    try:
        assert await reply(reader) == 220
        greeted = time.perf_counter()
        writer.write(b"EHLO agent.example\r\n")
        await reply(reader)
        asked = time.perf_counter()
        writer.write(f"AUTH PLAIN {token(AGENT, PASSWORD)}\r\n".encode())
        code = await reply(reader)
        assert code == 235, code
        done = time.perf_counter()
        return Phases(done - started, connected - started, greeted - connected, done - asked)
    finally:
        writer.close()


@dataclass(frozen=True)
class Phases:
    total: float
    connect: float
    greeting: float
    auth: float


async def attacker(port: int, source: str, stop: asyncio.Event, codes: Counter[int]) -> None:
    guess = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            codes[-1] += 1
            continue
        try:
            greeting = await reply(reader)
            if greeting != 220:
                codes[greeting] += 1
                await asyncio.sleep(0.05)
                continue
            writer.write(b"EHLO guess.example\r\n")
            await reply(reader)
            while not stop.is_set():
                guess += 1
                writer.write(f"AUTH PLAIN {token(AGENT, f'guess {guess}')}\r\n".encode())
                code = await reply(reader)
                codes[code] += 1
                if code in (0, 421):
                    break
        except (OSError, TimeoutError):
            codes[-1] += 1
        finally:
            writer.close()


async def agent_logins(port: int, stop: asyncio.Event, times: list[Phases]) -> None:
    while not stop.is_set():
        times.append(await login_time(port))
        await asyncio.sleep(0.5)


def summary(logins: list[Phases]) -> str:
    def ms(values: list[float]) -> str:
        return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"

    return (
        f"{ms([p.total for p in logins])} ({len(logins)} logins; connect"
        f" {ms([p.connect for p in logins])}; greeting {ms([p.greeting for p in logins])};"
        f" AUTH to 235 {ms([p.auth for p in logins])})"
    )


async def run(args: argparse.Namespace, port: int) -> None:
    alone = [await login_time(port) for _ in range(10)]
    print(f"agent login alone:        {summary(alone)}")
    stop = asyncio.Event()
    codes: Counter[int] = Counter()
    times: list[Phases] = []
    sources = [
        f"127.1.{n // 250}.{n % 250 + 1}" if args.spread == "many" else "127.1.0.1"
        for n in range(args.attackers)
    ]
    tasks = [asyncio.create_task(attacker(port, s, stop, codes)) for s in sources]
    await asyncio.sleep(1)  # let the flood build up
    agent = asyncio.create_task(agent_logins(port, stop, times))
    await asyncio.sleep(args.seconds)
    stop.set()
    await agent
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    seconds = args.seconds + 1
    print(f"agent login under flood:  {summary(times)}")
    print(
        f"guesses checked (535):    {codes[535] / seconds:.1f}/s;"
        f" refused unchecked: 454 {codes[454] / seconds:.1f}/s, 421 {codes[421] / seconds:.1f}/s;"
        f" connection errors {codes[-1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--spread", choices=["many", "one"], default="many")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sealrelay-auth-"))
    port, web = free_port(), free_port()
    config = work / "relay.toml"
    config.write_text(
        f"""
[server]
hostname = "relay.bench.example"
[smtp]
listen = ["127.0.0.1:{port}"]
allow_plaintext_auth_on_loopback = true
[web]
listen = "127.0.0.1:{web}"
[upstream]
url = "capture:{work / "outbox"}"
[database]
url = "sqlite+aiosqlite:///{work / "relay.db"}"
[storage]
path = "{work / "blobs"}"
"""
    )
    subprocess.run(
        [SEALRELAY, "user", "add", AGENT, "--password-stdin", "--config", str(config)],
        input=f"{PASSWORD}\n".encode(),
        capture_output=True,
        check=True,
    )
    with (work / "relay.log").open("wb") as log:
        relay = subprocess.Popen(
            [SEALRELAY, "serve", "--config", str(config)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not start; see " + str(work / "relay.log"))
            time.sleep(0.1)
        asyncio.run(run(args, port))
    finally:
        relay.terminate()
        relay.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
