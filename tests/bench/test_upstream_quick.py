"""bench/upstream.py at a small size, over its latency proxy: it runs end to end and prints a
figure for each way of sending (a smoke test, not a speed test)."""

from __future__ import annotations

import re

from tests.bench.support import NUMBER, run_bench


async def test_the_upstream_bench_prints_each_way_over_a_round_trip() -> None:
    status, text = await run_bench("upstream.py", "--copies", "40", "--rtt", "5", timeout=120)
    assert status == 0, text
    assert "round trip 5 ms" in text, text
    for way in ("new", "kept", "pipelined", "chunked"):
        figures = (
            rf"^  {way} +CPU {NUMBER} ms per copy, {NUMBER} copies/s, [1-9][0-9]* connections$"
        )
        assert re.search(figures, text, re.MULTILINE), text


async def test_an_unknown_way_is_refused_naming_it() -> None:
    status, text = await run_bench("upstream.py", "--ways", "kept,carrier-pigeon", timeout=60)
    assert status == 2, text
    assert "--ways: unknown carrier-pigeon" in text, text
