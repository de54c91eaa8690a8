"""Crash cycles: SIGKILL `sealrelay serve` again and again mid-traffic; count lost and twice-sent.

    .venv/bin/python bench/crash.py --cycles 20
    .venv/bin/python bench/crash.py --cycles 5 --backend sqlite --sessions 10
    .venv/bin/python bench/crash.py --cycles 5 --size 600000 --min-kill 5 --max-kill 30
    .venv/bin/python bench/crash.py --cycles 5 --processes 2
    .venv/bin/python bench/crash.py --cycles 10 --chunking

Per backend (SQLite in a temp directory, a fresh PostgreSQL database), a real relay process
runs with the shipped worker settings and a recording SMTP sink as its upstream. Each cycle
starts the relay, sends from several sessions until a random number of messages got their
250 (the same numbers for the same --seed), and kills the relay with SIGKILL while copies are
being accepted and delivered; the next cycle starts it again on the same database. After the
last cycle the relay runs until every accepted message has reached the sink.

Prints per backend: cycles, accepted, lost (accepted, never delivered), duplicates (copies
the sink got more than once) in all and per kill. A kill can cause at most as many
duplicates as copies were sent and not yet recorded: `[worker] concurrency` groups (20 as
shipped; a destination's turn ends with its send, its slot with the record). With --size,
each message carries that many octets more (past 256 KiB: spooled, and its spool file kept
as the stored original) and must reach the sink whole: a copy without its last line counts
as damaged. With --processes N the relay runs `serve --processes N`, and a kill ends the
supervisor and every process at once. Exits 1 if any accepted message was lost or damaged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import database_url  # noqa: E402
from tests.conftest import AGENT, PASSWORD  # noqa: E402
from tests.store.test_durability import RelayProcess, burst_message, message_ids  # noqa: E402
from tests.support import Sink  # noqa: E402


@dataclass
class Figures:
    backend: str
    cycles: int = 0
    accepted: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_per_kill: float = 0.0
    damaged: int = 0  # with --size: copies that reached the sink without their last line
    client_errors: int = 0
    seconds: float = 0.0


def crash_message(tag: str, number: int, size: int) -> tuple[str, EmailMessage]:
    """burst_message(), `size` octets longer, its last line naming it."""
    message_id, message = burst_message(tag, number)
    if size:
        line = "x" * 76 + "\n"
        padding = line * (size // len(line))
        message.set_content(f"Message {number}\n{padding}end of {message_id}\n")
    return message_id, message


async def send_until(
    relay: RelayProcess, tag: str, kill_after: int, sessions: int, size: int = 0
) -> set[str]:
    """Send from `sessions` sessions; SIGKILL the relay once `kill_after` messages got 250."""
    accepted: set[str] = set()
    numbers = iter(range(1_000_000))

    async def session() -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.smtp_port,
            start_tls=False,
            local_hostname="client.crash.test",
            timeout=15,
        )
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.connect()
            await client.login(AGENT, PASSWORD)
            for number in numbers:
                message_id, message = crash_message(tag, number, size)
                await client.send_message(message)
                accepted.add(message_id)
                if len(accepted) == kill_after:
                    relay.kill()
        client.close()

    await asyncio.gather(*(session() for _ in range(sessions)))
    return accepted


async def run_backend(backend: str, args: argparse.Namespace) -> Figures:
    figures = Figures(backend)
    rng = random.Random(f"{args.seed}-{backend}")
    began = time.monotonic()
    sink = await Sink(pipelining=args.chunking, chunking=args.chunking).start()
    try:
        with tempfile.TemporaryDirectory(prefix="sealrelay-crash-") as tmp:
            directory = Path(tmp)
            async with database_url(backend, directory) as url:
                relay = RelayProcess(
                    directory,
                    url,
                    sink.port,
                    serve_args=("--processes", str(args.processes)),
                )
                relay.write_config()
                lease = f"lease_seconds = {args.lease}\n" if args.lease else ""
                relay.config.write_text(
                    relay.config.read_text().replace("lease_seconds = 2\n", lease)
                )
                await relay.add_agent()
                accepted: set[str] = set()
                try:
                    for cycle in range(args.cycles):
                        await relay.start()
                        tag = f"{backend}-{cycle}"
                        got = await send_until(
                            relay,
                            tag,
                            rng.randint(args.min_kill, args.max_kill),
                            args.sessions,
                            args.size,
                        )
                        if await relay.wait_exit() != -signal.SIGKILL:
                            raise SystemExit(f"the relay ended on its own:\n{relay.log_tail()}")
                        accepted |= got
                        figures.cycles += 1
                        print(f"  {backend} cycle {cycle + 1}: {len(got)} accepted", flush=True)
                    await relay.start()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.timeout):
                            await wait_delivered(sink, accepted, relay)
                finally:
                    await relay.stop()
    finally:
        await sink.stop()
    copies = message_ids(sink)
    figures.accepted = len(accepted)
    figures.delivered = len(accepted & copies.keys())
    figures.lost = len(accepted - copies.keys())
    figures.duplicates = sum(n - 1 for n in copies.values() if n > 1)
    if args.size:
        figures.damaged = sum(
            1 for copy in sink.messages if b"end of <dur-" not in copy.data[-200:]
        )
    figures.duplicates_per_kill = round(figures.duplicates / max(figures.cycles, 1), 2)
    figures.seconds = round(time.monotonic() - began, 1)
    return figures


async def wait_delivered(sink: Sink, wanted: set[str], relay: RelayProcess) -> None:
    """Until every wanted message reached the sink and the queue is empty."""
    while True:
        if wanted <= message_ids(sink).keys() and await relay.queued() == 0:
            return
        await asyncio.sleep(0.2)


def print_figures(all_figures: list[Figures]) -> None:
    print(
        f"{'backend':10} {'cycles':>6} {'accepted':>8} {'lost':>5} {'damaged':>7}"
        f" {'duplicates':>10} {'dup %':>6} {'dup/kill':>8} {'seconds':>8}"
    )
    for f in all_figures:
        share = 100 * f.duplicates / f.accepted if f.accepted else 0.0
        print(
            f"{f.backend:10} {f.cycles:>6} {f.accepted:>8} {f.lost:>5} {f.damaged:>7}"
            f" {f.duplicates:>10} {share:>6.2f} {f.duplicates_per_kill:>8} {f.seconds:>8}"
        )


async def main_async(args: argparse.Namespace) -> int:
    results = []
    for backend in args.backend:
        results.append(await run_backend(backend, args))
    print_figures(results)
    if args.json:
        print(json.dumps([asdict(f) for f in results]))
    return 1 if any(f.lost or f.damaged for f in results) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=20, help="SIGKILL cycles per backend")
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=("sqlite", "postgres"),
        default=["sqlite", "postgres"],
    )
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("--min-kill", type=int, default=40, help="fewest 250s before a kill")
    parser.add_argument("--max-kill", type=int, default=160, help="most 250s before a kill")
    parser.add_argument("--seed", default="2026", help="the same seed, the same kill points")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to deliver all")
    parser.add_argument(
        "--lease", type=float, default=None, help="worker lease seconds (default: as shipped)"
    )
    parser.add_argument(
        "--size", type=int, default=0, help="octets added to each message (default: none)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="sealrelay serve --processes N (default 1)"
    )
    parser.add_argument(
        "--chunking",
        action="store_true",
        help="the sink offers PIPELINING and CHUNKING, as Microsoft 365 and Gmail do: a small"
        " copy leaves as one BDAT chunk in the same write as its envelope",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
