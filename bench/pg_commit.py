"""PostgreSQL's own CPU for a small message's writes in the group commit, step by step.

    .venv/bin/python bench/pg_commit.py
    .venv/bin/python bench/pg_commit.py --messages 3000 --rounds 3

bench/compare.py counts PostgreSQL's CPU with the relay's (about 1.4 ms of some 3.9 ms a
small message); this says where it goes. It runs bench/instructions.py's commit stage (the
relay's own statements: intake's rows, inline blob and events, 20 messages to a
transaction; the claim; the hold; the outcome with its event; the sequencer's pass) on a
fresh, migrated database on the server `SEALRELAY_TEST_POSTGRES_URL` names (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test; it must run on this host). After each
step it reads the server backend's CPU from /proc, and this process's CPU: the relay's
statements and the driver, as the group commit runs them. Nothing else runs, so the
figures move far less than an end-to-end run's.

`--prefill N` first commits N messages and ANALYZEs (bench/prefill.py), as a database in
service. `--prefill 0` measures a new one, never analyzed: there the claim reads both
tables whole and costs more the more mail the database holds, until autovacuum's first
ANALYZE.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from sqlalchemy import Connection, text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from bench.harness import cpu_seconds, database_url  # noqa: E402
from bench.instructions import BATCH_OF, commit_steps, messages, transactions_on  # noqa: E402
from bench.prefill import prefill as fill  # noqa: E402

STEPS = ("intake", "claim", "hold", "settle", "chain")


def one_round(
    connection: Connection, batches: Sequence[list[tuple[bytes, str]]]
) -> dict[str, tuple[float, float]]:
    """Per step, CPU seconds per message of the server and of this process (the relay's code
    and the driver), over `batches`; run on the connection's greenlet
    (AsyncConnection.run_sync), each step its own transaction."""
    pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    connection.commit()
    used = {step: [0.0, 0.0] for step in STEPS}
    mark = [cpu_seconds([pid]), time.process_time()]
    transaction = transactions_on(connection)

    def after(step: str) -> None:
        now = [cpu_seconds([pid]), time.process_time()]
        for side in (0, 1):
            used[step][side] += now[side] - mark[side]
        mark[:] = now

    for batch in batches:
        commit_steps(batch, transaction, after)
    count = sum(len(batch) for batch in batches)
    return {step: (server / count, ours / count) for step, (server, ours) in used.items()}


async def measure(count: int, rounds: int, prefill: int) -> list[dict[str, tuple[float, float]]]:
    raws = messages(BATCH_OF + count * rounds)
    found = [(raw, hashlib.sha256(raw).hexdigest()) for raw in raws]
    results = []
    with tempfile.TemporaryDirectory() as directory:
        async with database_url("postgres", Path(directory)) as url:
            await fill(url, prefill)
            engine = create_async_engine(url, pool_size=1, max_overflow=0)
            try:
                async with engine.connect() as connection:
                    warm = [found[:BATCH_OF]]  # statements prepared, caches filled: not counted
                    await connection.run_sync(lambda sync: one_round(sync, warm))
                    rest = found[BATCH_OF:]
                    for turn in range(rounds):
                        mine = rest[turn * count : (turn + 1) * count]
                        batches = _batches(mine)
                        results.append(
                            await connection.run_sync(lambda sync, b=batches: one_round(sync, b))
                        )
            finally:
                await engine.dispose()
    return results


def _batches(found: list[tuple[bytes, str]]) -> list[list[tuple[bytes, str]]]:
    return [found[i : i + BATCH_OF] for i in range(0, len(found), BATCH_OF)]


def _of(found: dict[str, tuple[float, float]], step: str, side: int) -> float:
    if step == "all":
        return sum(sides[side] for sides in found.values())
    return found[step][side]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3000, help="5 KB messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prefill", type=int, default=10000, help="messages in the database before (0: new)"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rounds < 1 or args.prefill < 0:
        parser.error("--messages and --rounds: at least 1; --prefill: at least 0")
    found = asyncio.run(measure(args.messages, args.rounds, args.prefill))
    held = f"after {args.prefill} analyzed" if args.prefill else "on a new, unanalyzed database"
    print(
        f"pg_commit: {args.messages} messages of about 5 KB per round, {BATCH_OF} to a"
        f" transaction, {args.rounds} round(s), {held}; CPU per message, median"
    )
    print(f"  {'step':6} {'server':>8} {'relay':>8}")
    for step in (*STEPS, "all"):
        server, ours = (
            statistics.median(_of(r, step, side) for r in found) * 1000 for side in (0, 1)
        )
        print(f"  {step:6} {server:.3f} ms {ours:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
