"""What the benches' smoke tests share: running a bench script as the reader would, and the
pattern of a figure in its output."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


async def run_bench(script: str, *args: str, timeout: float) -> tuple[int, str]:
    """`bench/{script}` with `args` from the repository root: its exit status and its output
    (stdout and stderr together). A run past `timeout` seconds is killed (the test fails with
    TimeoutError), so no bench outlives its test."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / script),
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8", errors="replace")
