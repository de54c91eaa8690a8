"""Byte scans of one big message, each timed and its extra memory measured, in-process.

    .venv/bin/python bench/scan.py
    .venv/bin/python bench/scan.py --mib 25 --rounds 9
    .venv/bin/python bench/scan.py --text

The steps a 10 MiB message goes through on the event loop thread between the socket and
the upstream, through their public functions only (so the same script measures an older
checkout: `PYTHONPATH=/path/to/old/tree`): reading DATA (dot-unstuffing and the line
length check included), the bare CR/LF check, the MIME parse, the part sizes policy reads,
and the outgoing copy (trace fields, DKIM body hash and signature). The message is
bench/relay.py's: a short quoted-printable text and a base64 attachment, CRLF throughout;
with `--text`, plain text whose lines mostly end in a full stop, with dots every few words
(where the end of DATA, CRLF "." CRLF, is hardest to find).

For each step it prints the least CPU time of `--rounds` runs (ms per 10 MiB; CPU time,
and the least, since other work on the machine inflates wall times and medians) and the peak
of memory allocated during one run beyond its input (tracemalloc, in a separate run so the
tracing does not slow the timed ones): copies of the message show up there as multiples of
its size.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import make_body, make_header  # noqa: E402
from gateway.fronts.data_reader import DataFeed  # noqa: E402
from gateway.fronts.smtp_protocol import DATA_LINE_LIMIT  # noqa: E402
from gateway.mail import dkim, headers, mime, outgoing  # noqa: E402
from gateway.store.models import Message  # noqa: E402

MIB = 1024 * 1024
FEED = 256 * 1024  # what a socket read hands the stream reader under load


TEXT = (
    b"Das Haus hat 3.5 Zimmer, ca. 120 m2 Wohnflaeche und liegt am See.\r\n"
    b"Besichtigung nach Vereinbarung, z.B. am Sa. oder So.\r\n"
    b"Mit freundlichen Gruessen\r\n"
)


def the_message(size: int, text: bool = False) -> bytes:
    _, header = make_header("scan", 1)
    if text:
        header += b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        return header + TEXT * max(1, (size - len(header)) // len(TEXT))
    return header + make_body(size, len(header))


def read_wire(wire: bytes) -> int:
    """The front's `DataFeed` given socket-sized pieces while its session spools them, then
    the message read back, as a session runs it (the spool in the temp directory).

    The size, not the bytes, is the coroutine's result: asyncio would repr a 10 MB result.
    """

    async def run() -> int:
        feed = DataFeed(None, DATA_LINE_LIMIT, None)
        spooling = asyncio.create_task(feed.spooled())
        for start in range(0, len(wire), FEED):
            if feed.feed(wire[start : start + FEED]) is not None:
                break
            await asyncio.sleep(0)
        spooled = await spooling
        try:
            return len(await spooled.read())
        finally:
            spooled.close()

    return asyncio.run(run())


def steps(raw: bytes) -> dict[str, Callable[[], Any]]:
    wire = raw.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    root = mime.parse(raw)
    key = dkim.DkimKey("bench.example", "bench", rsa.generate_private_key(65537, 2048))
    signer = outgoing.Signer({"bench.example": key})
    message = Message(
        id="0123456789abcdef0123456789abcdef",
        received_at=datetime(2026, 12, 3, tzinfo=UTC),
        message_id_header="<scan@bench.example>",
        helo="client.bench.example",
        peer="127.0.0.1",
        protocol="ESMTPA",
        trusted_client=None,
    )
    return {
        "read DATA (end, unstuff, line limit, spool)": lambda: read_wire(wire),
        "bare CR/LF check": lambda: headers.has_bare_line_end(raw),
        "MIME parse": lambda: mime.parse(raw),
        "part sizes (decoded_size)": lambda: mime.part_facts(raw, root),
        "outgoing copy (DKIM body hash, sign)": lambda: outgoing.prepare(
            raw, message, "relay.bench.example", signer
        ),
    }


def timed(step: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.process_time()
        step()
        times.append(time.process_time() - began)
    return min(times)


def extra_memory(step: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = step()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=float, default=10, help="message size in MiB")
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per step (least)")
    parser.add_argument("--text", action="store_true", help="plain text, not an attachment")
    args = parser.parse_args()
    raw = the_message(int(args.mib * MIB), args.text)
    per = MIB * 10 / len(raw)
    print(
        f"one message of {len(raw) / MIB:.1f} MiB;"
        f" CPU times, least of {args.rounds} runs, per 10 MiB"
    )
    total = 0.0
    for name, step in steps(raw).items():
        seconds = timed(step, args.rounds) * per
        total += seconds
        extra = extra_memory(step)
        print(f"  {name:40} {seconds * 1000:7.1f} ms   peak extra {extra / MIB:6.1f} MiB")
    print(f"  {'all steps':40} {total * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
