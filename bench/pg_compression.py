"""PostgreSQL's CPU to store small mail as inline blobs, by how the column is compressed.

    .venv/bin/python bench/pg_compression.py
    .venv/bin/python bench/pg_compression.py --rows 1000 --rounds 3

Inline blobs (gateway/store/inline_blobs.py) are a small message's bytes, written in the
group commit. PostgreSQL tries to compress any value over 2 KB before it stores it; mail is
largely base64 of files already compressed, so the try mostly fails, and what it costs is
the server's, not the relay's (bench/compare.py counts it as "of it PostgreSQL"). This
inserts bench/relay.py's 5 KB messages, 20 to a transaction as under load, into a table
shaped like inline_blobs with the column set to each method in turn (pglz, PostgreSQL's
default; lz4, what migration 0017 sets; none: `STORAGE EXTERNAL`), and prints the server
backend's CPU per row (the server must run on this host) and the table's
size. A fresh database on the server `SEALRELAY_TEST_POSTGRES_URL` names (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test), dropped at the end.
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
from collections.abc import Sequence  # noqa: E402

import asyncpg  # noqa: E402

from bench.harness import cpu_seconds, database_url  # noqa: E402
from bench.instructions import BATCH_OF, messages  # noqa: E402

METHODS = {
    "pglz": "SET COMPRESSION pglz",
    "lz4": "SET COMPRESSION lz4",
    "none": "SET STORAGE EXTERNAL",
}


async def one_round(
    connection: asyncpg.Connection, method: str, raws: Sequence[bytes]
) -> tuple[float, int]:
    """CPU seconds per row and the table's bytes, for `raws` stored under `method`."""
    await connection.execute("DROP TABLE IF EXISTS blob_probe")
    await connection.execute(
        "CREATE TABLE blob_probe (digest text PRIMARY KEY, size integer NOT NULL,"
        " written_at timestamptz NOT NULL, data bytea NOT NULL)"
    )
    await connection.execute(f"ALTER TABLE blob_probe ALTER COLUMN data {METHODS[method]}")
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    rows = [(hashlib.sha256(raw).hexdigest(), len(raw), raw) for raw in raws]
    start = cpu_seconds([pid])
    for first in range(0, len(rows), BATCH_OF):
        async with connection.transaction():
            await connection.executemany(
                "INSERT INTO blob_probe VALUES ($1, $2, now(), $3)", rows[first : first + BATCH_OF]
            )
    used = cpu_seconds([pid]) - start
    size = await connection.fetchval("SELECT pg_total_relation_size('blob_probe')")
    return used / len(rows), int(size)


async def measure(rows: int, rounds: int) -> dict[str, list[tuple[float, int]]]:
    raws = messages(rows)
    found: dict[str, list[tuple[float, int]]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory() as directory:
        async with database_url("postgres", Path(directory)) as url:
            connection = await asyncpg.connect(
                url.replace("postgresql+asyncpg://", "postgresql://")
            )
            try:
                for turn in range(rounds):
                    order = list(METHODS) if turn % 2 == 0 else list(reversed(METHODS))
                    for method in order:
                        found[method].append(await one_round(connection, method, raws))
            finally:
                await connection.close()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=3000, help="5 KB messages per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each method once a round")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds: at least 1")
    found = asyncio.run(measure(args.rows, args.rounds))
    print(f"pg_compression: {args.rows} rows of about 5 KB per round, {args.rounds} round(s)")
    for method, results in found.items():
        per_row = statistics.median(cpu for cpu, _ in results) * 1000
        size = max(size for _, size in results) // 1024
        print(f"  {method:5} {per_row:.3f} ms of the server's CPU per row (median), {size:,} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
