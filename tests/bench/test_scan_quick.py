"""bench/scan.py at a small size: every step of a big message's path runs through the
relay's current functions and prints its figures (a smoke test, not a speed test; the script
once stood broken for sessions after the front it imported was rewritten)."""

from __future__ import annotations

import re

from tests.bench.support import NUMBER, run_bench

STEPS = (
    "read DATA (end, unstuff, line limit, spool)",
    "bare CR/LF check",
    "MIME parse",
    "part sizes (decoded_size)",
    "outgoing copy (DKIM body hash, sign)",
    "all steps",
)


async def test_the_scan_bench_prints_each_step() -> None:
    for shape in ((), ("--text",)):
        args = ("--mib", "0.5", "--rounds", "1", *shape)
        status, text = await run_bench("scan.py", *args, timeout=120)
        assert status == 0, text
        assert "one message of 0.5 MiB" in text, text
        for step in STEPS:
            line = rf"^  {re.escape(step)} +{NUMBER} ms"
            assert re.search(line, text, re.MULTILINE), (step, text)
