"""The fixed cost of one group transaction: what a batch pays whatever it carries.

    .venv/bin/python bench/group_commit.py
    .venv/bin/python bench/group_commit.py --backends sqlite,postgres --transactions 5000

A relay's CPU per small message falls as its load rises (bench/README.md): under load the
group commit (gateway/store/group_commit.py) carries many sessions' work in one transaction,
at a light load nearly one each, and each transaction has a cost of its own. Here, on a new
database of each backend, with no rows written, one after another:

- **loop turn**: `asyncio.sleep(0)`, the floor;
- **transaction**: `group_commit.submit` of a unit that writes nothing: the queue, the
  checkout, on SQLite the hop to the driver's thread, BEGIN IMMEDIATE and COMMIT (no fsync:
  nothing was written), the answer;
- **N units at once**: N such units submitted together, which share one transaction; the CPU
  per unit.

CPU is this process's (user + system: the driver's thread included, PostgreSQL's server not),
per transaction or unit, in microseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402

from sqlalchemy import Connection  # noqa: E402

from bench.harness import database_url  # noqa: E402
from bench.options import comma_separated  # noqa: E402
from gateway.store import group_commit  # noqa: E402
from gateway.store.db import Database  # noqa: E402
from gateway.store.group_commit import Done  # noqa: E402
from sealrelay.serve import event_loop  # noqa: E402

BACKENDS = ("sqlite", "postgres")
WARM_UP = 200


def nothing(_connection: Connection) -> Done[None]:
    return Done(None)


async def cpu_per_call(call: Callable[[], Awaitable[object]], count: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per call, the calls one after another, after a warm-up."""
    for _ in range(WARM_UP):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await call()
    return (
        (time.process_time() - cpu) / count * 1e6,
        (time.perf_counter() - wall) / count * 1e6,
    )


async def one_backend(backend: str, count: int, groups: Sequence[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="sealrelay-group-commit-") as directory:
        async with database_url(backend, Path(directory)) as url:
            db = Database.connect(url)
            try:
                await db.upgrade()
                await measure(db, backend, count, groups)
            finally:
                await db.close()


async def measure(db: Database, backend: str, count: int, groups: Sequence[int]) -> None:
    async def loop_turn() -> None:
        await asyncio.sleep(0)

    async def transaction() -> None:
        await group_commit.submit(db, nothing)

    print(f"{backend}:")
    for name, call in (
        ("loop turn", loop_turn),
        ("transaction", transaction),
    ):
        cpu, wall = await cpu_per_call(call, count)
        print(f"  {name:16} {cpu:8.1f} us CPU {wall:8.1f} us wall", flush=True)
    for size in groups:

        async def together(size: int = size) -> None:
            await asyncio.gather(*(group_commit.submit(db, nothing) for _ in range(size)))

        rounds = max(1, count // size)
        cpu, wall = await cpu_per_call(together, rounds)
        per_unit = f"{cpu / size:8.1f} us CPU {wall / size:8.1f} us wall per unit"
        print(f"  {size:3} units at once {per_unit}", flush=True)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--backends",
        type=comma_separated(BACKENDS),
        default="sqlite",
        help="comma-separated: sqlite, postgres",
    )
    parser.add_argument("--transactions", type=int, default=3000, help="per figure (default 3000)")
    parser.add_argument(
        "--groups", default="1,5,20", help="units submitted at once (default 1,5,20)"
    )
    args = parser.parse_args(argv)
    if args.transactions < 1:
        parser.error("--transactions: at least 1")
    try:
        args.groups = [int(size) for size in args.groups.split(",")]
    except ValueError:
        parser.error("--groups: whole numbers, comma-separated")
    if any(size < 1 for size in args.groups):
        parser.error("--groups: each at least 1")
    return args


async def run(args: argparse.Namespace) -> None:
    for backend in args.backends:
        await one_backend(backend, args.transactions, args.groups)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    factory, loop_name = event_loop()
    print(
        f"group commit: the fixed cost of a transaction, {args.transactions} per figure,"
        f" on {loop_name}"
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
