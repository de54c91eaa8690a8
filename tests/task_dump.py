"""SIGUSR1 writes every asyncio task's stack, and every thread's, to
/tmp/sealrelay-tasks-PID.txt: what a suite that waits for ever is waiting for (a thread dump
alone shows only the event loop in epoll). A file, because pytest holds stderr while a test
runs."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
from types import FrameType


def _dump(signum: int, frame: FrameType | None) -> None:
    with open(f"/tmp/sealrelay-tasks-{os.getpid()}.txt", "w") as out:
        faulthandler.dump_traceback(out)
        loop = asyncio._get_running_loop()
        tasks = asyncio.all_tasks(loop) if loop is not None else set()
        print(f"\n{len(tasks)} asyncio tasks", file=out)
        for task in tasks:
            print(file=out)
            task.print_stack(file=out)


def install() -> None:
    signal.signal(signal.SIGUSR1, _dump)
