"""bench/s3_downloads.py at a small size: it runs end to end and prints its figures (a smoke
test, not a speed test: the bench checks each server's bytes once by sha256)."""

from __future__ import annotations

import re

from tests.bench.support import NUMBER, run_bench


async def test_the_s3_download_bench_prints_its_figures() -> None:
    status, text = await run_bench(
        "s3_downloads.py", *("--mib", "3", "--clients", "2", "--rounds", "1"), timeout=120
    )
    assert status == 0, text
    assert re.search(rf"local \(sendfile\) +{NUMBER} MiB/s +web CPU {NUMBER} s/GiB", text), text
    assert re.search(rf"s3 via moto \(streamed\) +{NUMBER} MiB/s", text), text
    assert re.search(rf"s3 / local +{NUMBER}x", text), text
