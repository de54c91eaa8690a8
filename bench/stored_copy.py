"""CPU of one big outgoing copy, built whole against streamed from a local blob store.

    .venv/bin/python bench/stored_copy.py [--size 10000000] [--rounds 3]

Each round builds, checks and dot-stuffs the copy five times each way, as the delivery
worker does before it writes to the upstream (no network): whole is `prepare` over the blob
read at once, then `stuffed_pieces`; streamed is `stored_copy.build` (the body hash pass)
then `stuffed_stream` (the second read), as for a copy the relay changed; read once is the
same for a submitted original whose body hash the intake kept (one read, proved by its
sha256 as it is sent), with the intake's cost of that body hash beside it. Prints process
CPU per copy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.mail.dkim import DkimKey, generate_private_key  # noqa: E402
from gateway.mail.outgoing import Signer, prepare  # noqa: E402
from gateway.outbound.smtp_connection import (  # noqa: E402
    bare_line_end_refusal,
    stuffed_pieces,
    stuffed_stream,
)
from gateway.outbound.stored_copy import build, intake_body_hash  # noqa: E402
from gateway.store.local_blobs import LocalBlobStore  # noqa: E402
from gateway.store.models import Message, MessageKind  # noqa: E402

DOMAIN = "bench.example"
EACH = 5


def message_row(size: int) -> Message:
    return Message(
        id="0123456789abcdef0123",
        sender=f"agent@{DOMAIN}",
        blob="",
        size=size,
        message_id_header=f"<big@{DOMAIN}>",
        received_at=datetime.now(UTC),
        helo="client.bench.example",
        peer="192.0.2.1",
        protocol="ESMTPSA",
        trusted_client=None,
    )


async def run(size: int, rounds: int) -> None:
    signer = Signer({DOMAIN: DkimKey(DOMAIN, "bench", generate_private_key())})
    encoded = base64.encodebytes(random.Random(18).randbytes(size * 3 // 4))
    raw = (
        f"From: agent@{DOMAIN}\r\nTo: p@example.com\r\nSubject: big\r\n\r\n".encode()
        + encoded.replace(b"\n", b"\r\n")
    )
    store = LocalBlobStore(Path(tempfile.mkdtemp(prefix="bench-copy-")))
    digest = await store.put(raw)
    row = message_row(len(raw))
    original = message_row(len(raw))
    original.blob, original.kind = digest, MessageKind.SUBMITTED
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(EACH):
            data = prepare(await store.read(digest), row, "relay.bench.example", signer)
            assert bare_line_end_refusal(data) is None
            whole_sent = sum(map(len, stuffed_pieces(data)))
        whole = (time.process_time() - started) / EACH
        started = time.process_time()
        for _ in range(EACH):
            async with store.open(digest) as blob:
                copy = await build(blob, row, "relay.bench.example", signer)
                assert bare_line_end_refusal(copy) is None
                streamed_sent = 0
                async for piece in stuffed_stream(copy):
                    streamed_sent += len(piece)
        streamed = (time.process_time() - started) / EACH
        started = time.process_time()
        for _ in range(EACH):
            original.body_hash = intake_body_hash(raw, {DOMAIN})
        intake = (time.process_time() - started) / EACH
        started = time.process_time()
        for _ in range(EACH):
            async with store.open(digest) as blob:
                copy = await build(blob, original, "relay.bench.example", signer, digest=digest)
                assert bare_line_end_refusal(copy) is None
                once_sent = 0
                async for piece in stuffed_stream(copy):
                    once_sent += len(piece)
        once = (time.process_time() - started) / EACH
        assert whole_sent == streamed_sent == once_sent
        print(
            f"{len(raw):,} B copy, CPU per copy: whole {whole * 1000:.1f} ms,"
            f" streamed {streamed * 1000:.1f} ms, read once {once * 1000:.1f} ms"
            f" (+ {intake * 1000:.1f} ms at intake)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000, help="bytes of the message")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.size, args.rounds))


if __name__ == "__main__":
    main()
