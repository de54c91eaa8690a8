"""What the benches' smoke tests share: running a bench script as the reader would, and the
pattern of a figure in its output."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support import run_process

ROOT = Path(__file__).resolve().parent.parent.parent
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


async def run_bench(script: str, *args: str, timeout: float) -> tuple[int, str]:
    """`bench/{script}` with `args` from the repository root: its exit status and its output
    (stdout and stderr together). A run past `timeout` seconds is killed (the test fails with
    TimeoutError), so no bench outlives its test."""
    return await run_process(
        sys.executable, str(ROOT / "bench" / script), *args, timeout=timeout, cwd=ROOT
    )
