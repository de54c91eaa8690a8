"""Where the relay's CPU goes, by stage, from a py-spy recording of bench/relay.py.

    .venv/bin/python bench/relay.py --messages 400 --size 5000 --sessions 20 --py-spy stacks.txt
    .venv/bin/python bench/stages.py stacks.txt --cpu-ms 9.2
    .venv/bin/python bench/stages.py stacks.txt --detail "SMTP front"

bench/relay.py records with `py-spy record --threads --gil`: a sample is taken of the thread
that holds the GIL, so the shares are of the Python work, the event loop's and the worker
threads'. Time in the kernel (fsync, socket writes) and in C code that lets the GIL go
(SQLite's own work) is not sampled; bench/relay.py's CPU figures include it. With
`--processes N` py-spy follows the relay's processes (`--subprocesses`), and the shares are
over all of them.

Each stack counts for one stage: from the innermost frame outwards, the first frame of our
own code that belongs to a stage decides (a library frame counts for our code that called
it, and so do our shared scans in gateway/mail/lines.py, used by the DATA reader, the
parser and the sender alike); a stack with no such frame goes to the first library stage
that matches (aiosmtpd, SQLAlchemy, aiosqlite), else to "event loop, asyncio, other". With
--cpu-ms (the relay's CPU per message that bench/relay.py printed) the shares are also
shown as milliseconds.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

OURS = ("gateway/", "rules/", "sealrelay/", "web/")
SHARED = ("gateway/mail/lines.py",)  # counts for its caller
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("(logging/",)),
    ("DKIM sign", ("gateway/mail/dkim.py",)),
    (
        "outgoing copy (evidence headers, loop mark)",
        ("gateway/mail/outgoing.py", "evidence_headers.py", "loop_mark.py"),
    ),
    (
        "parse + facts + plan",
        (
            "gateway/mail/mime.py",
            "rules/",
            "gateway/mail/headers.py",
            "message_facts",
            "Pipeline.draft",
            "Pipeline.receive",
            "Pipeline.prepare",
            "materializers.py",
        ),
    ),
    ("blob put/read", ("local_blobs.py", "store/blobs.py")),
    ("group commit: journal", ("store/journal.py", "store/events.py")),
    (
        "group commit: intake, claim, hold, settle",
        ("store/bulk.py", "store/leases.py", "outbound/queue.py"),
    ),
    ("group commit: transaction, writer", ("group_commit.py", "sqlite_thread.py")),
    (
        "delivery send (upstream)",
        ("upstream.py", "smtp_connection.py", "connection_cache.py"),
    ),
    ("delivery worker", ("outbound/delivery.py", "outbound/routes.py")),
    ("SMTP front (aiosmtpd, checks, DATA)", ("aiosmtpd/", "gateway/fronts/")),
    ("intake pipeline", ("intake/pipeline.py",)),
    (
        "webhooks, notices, sweeper",
        ("webhooks/", "notices/", "sweeper.py", "health.py", "console/"),
    ),
    ("SQLAlchemy (ORM and async, no caller of ours)", ("sqlalchemy/",)),
    ("aiosqlite", ("aiosqlite/",)),
]
OTHER = "event loop, asyncio, other"


def stage(frames: list[str]) -> str:
    for own in (True, False):
        for frame in reversed(frames):
            if own and not any(f"({p}" in frame for p in OURS) and "(logging/" not in frame:
                continue
            if own and any(key in frame for key in SHARED):
                continue
            for name, keys in STAGES:
                if any(key in frame for key in keys):
                    return name
    return OTHER


def read(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread, frames outermost first, samples) per line of py-spy's collapsed stacks."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        parts = stack.split(";")
        while parts and parts[0].startswith("process "):  # py-spy --subprocesses
            parts.pop(0)
        if not parts:
            continue
        thread, *frames = parts
        stacks.append(("loop" if "MainThread" in thread else "threads", frames, int(count)))
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("stacks", type=Path, help="py-spy's raw output (bench/relay.py --py-spy)")
    parser.add_argument("--cpu-ms", type=float, default=None, help="relay CPU per message")
    parser.add_argument("--detail", default=None, help="list the stacks of stages named so")
    args = parser.parse_args()
    stacks = read(args.stacks)
    total = sum(count for _, _, count in stacks) or 1
    shares: Counter[tuple[str, str]] = Counter()
    for thread, frames, count in stacks:
        shares[(thread, stage(frames))] += count
    print(f"{total} samples")
    for (thread, name), count in shares.most_common():
        ms = f" {count / total * args.cpu_ms:5.2f} ms" if args.cpu_ms else ""
        print(f"{count * 100 / total:5.1f}%{ms}  {thread:7s} {name}")
    if args.detail:
        detail: Counter[str] = Counter()
        for _, frames, count in stacks:
            if args.detail.lower() in stage(frames).lower():
                own = [f.split(" (")[0] for f in frames if any(f"({p}" in f for p in OURS)]
                innermost = frames[-1] if frames else "(no frames)"
                detail[" < ".join(own[-3:][::-1]) + " || " + innermost] += count
        for line, count in detail.most_common(30):
            print(f"{count:6d} {line}")


if __name__ == "__main__":
    main()
