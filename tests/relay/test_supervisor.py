"""The supervisor of `serve --processes N` (sealrelay/processes.py), over stand-in children.

Each test runs tests/relay/supervised.py as a real process tree: real fork, real signals,
real SIGKILL. Children report on stdout, so the test awaits lines, not time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import psutil
import pytest

from sealrelay.processes import Backoff, Supervisor, die_with_parent

TIMEOUT = 20.0


@dataclass
class Tree:
    """The supervisor process and what its children said."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def line(self, prefix: str) -> list[str]:
        """The words of the next stdout line starting with `prefix` (earlier lines are kept)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"no {prefix!r} line; got {self.lines}")
                text = raw.decode().strip()
                self.lines.append(text)
                if text.startswith(prefix):
                    return text.split()

    async def ready(self, count: int) -> dict[int, int]:
        """index -> pid of the next `count` children to report ready."""
        found: dict[int, int] = {}
        while len(found) < count:
            _, index, pid = await self.line("ready ")
            found[int(index)] = int(pid)
        return found

    async def exit_code(self) -> int:
        async with asyncio.timeout(TIMEOUT):
            return await self.process.wait()

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


StartTree = Callable[[str, int], Awaitable[Tree]]


@pytest.fixture
async def start_tree() -> AsyncIterator[StartTree]:
    trees: list[Tree] = []

    async def start(behaviour: str, count: int) -> Tree:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.relay.supervised",
            behaviour,
            str(count),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        tree = Tree(process)
        trees.append(tree)
        return tree

    yield start
    for tree in trees:
        if tree.process.returncode is None:
            tree.process.kill()
            await tree.process.wait()


def gone(pid: int) -> bool:
    """The process has ended (a zombie not yet reaped by its parent counts as ended)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_sigterm_stops_every_child_and_exits_0(start_tree: StartTree) -> None:
    tree = await start_tree("serve", 3)
    pids = await tree.ready(3)
    assert sorted(pids) == [0, 1, 2]
    assert set(pids.values()) == {c.pid for c in psutil.Process(tree.process.pid).children()}

    tree.process.send_signal(signal.SIGTERM)
    stopped = {int((await tree.line("stopped "))[2]) for _ in range(3)}
    assert stopped == set(pids.values())
    assert await tree.exit_code() == 0
    assert all(gone(pid) for pid in pids.values())
    assert "all processes stopped" in await tree.stderr()


async def test_a_child_killed_is_restarted_in_its_place(start_tree: StartTree) -> None:
    tree = await start_tree("serve", 2)
    pids = await tree.ready(2)
    os.kill(pids[1], signal.SIGKILL)
    again = await tree.ready(1)
    assert list(again) == [1]
    assert again[1] != pids[1]
    children = {c.pid for c in psutil.Process(tree.process.pid).children()}
    assert children == {pids[0], again[1]}

    os.kill(again[1], signal.SIGKILL)  # and again: the slot is kept, with a longer wait
    third = await tree.ready(1)
    assert list(third) == [1]

    tree.process.send_signal(signal.SIGTERM)
    assert await tree.exit_code() == 0
    log = await tree.stderr()
    assert "process 1 was killed by SIGKILL; restarting it in 0.1 s" in log
    assert "process 1 was killed by SIGKILL; restarting it in 0.2 s" in log  # doubled


async def test_a_child_dying_before_it_is_ready_stops_all_and_exits_1(
    start_tree: StartTree,
) -> None:
    tree = await start_tree("fail-at-start", 2)
    failed = " ".join(await tree.line("failed:"))
    assert "process 1 exited with status 3 before it was ready" in failed
    assert "Not restarting" in failed
    assert await tree.exit_code() == 1
    assert not any(line.startswith("ready 1 ") for line in tree.lines)
    if any(line.startswith("ready 0 ") for line in tree.lines):
        assert any(line.startswith("stopped 0 ") for line in tree.lines)


async def test_children_that_ignore_sigterm_are_killed_after_the_stop_timeout(
    start_tree: StartTree,
) -> None:
    tree = await start_tree("stubborn", 2)
    pids = await tree.ready(2)
    tree.process.send_signal(signal.SIGTERM)
    assert await tree.exit_code() == 0
    assert all(gone(pid) for pid in pids.values())
    log = await tree.stderr()
    assert "process 0 did not stop in 1 s; killing it" in log
    assert "process 0 was killed by SIGKILL" in log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_children_end_when_the_supervisor_is_killed(start_tree: StartTree) -> None:
    tree = await start_tree("serve", 2)
    pids = await tree.ready(2)
    tree.process.kill()
    await tree.exit_code()
    stopped = {int((await tree.line("stopped "))[2]) for _ in range(2)}  # by the death signal
    assert stopped == set(pids.values())


def test_backoff_doubles_to_its_cap() -> None:
    backoff = Backoff(first=0.5, cap=4)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert Backoff(first=1, cap=30).delay(10_000) == 30


def test_a_supervisor_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor(0, lambda index, ready: 0)


def test_die_with_parent_is_accepted_by_the_kernel() -> None:
    """In a forked child, so that the test process's own setting is not changed."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if die_with_parent() == sys.platform.startswith("linux") else 2)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
