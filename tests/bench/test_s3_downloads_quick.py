"""bench/s3_downloads.py at a small size: it runs end to end and prints its figures (a smoke
test, not a speed test: the bench checks each server's bytes once by sha256)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


async def test_the_s3_download_bench_prints_its_figures() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "s3_downloads.py"),
        *("--mib", "3", "--clients", "2", "--rounds", "1"),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    text = out.decode()
    assert process.returncode == 0, text
    assert re.search(rf"local \(sendfile\) +{NUMBER} MiB/s +web CPU {NUMBER} s/GiB", text), text
    assert re.search(rf"s3 via moto \(streamed\) +{NUMBER} MiB/s", text), text
    assert re.search(rf"s3 / local +{NUMBER}x", text), text
