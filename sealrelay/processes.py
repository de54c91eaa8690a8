"""`sealrelay serve --processes N`: a supervisor that forks N relay processes and keeps them up.

One Python process uses one core: the event loop, the SMTP parsing, DKIM and the ORM all run on
it. Several processes, each with its own event loop and its own listeners bound with
SO_REUSEPORT (the kernel spreads new connections across them), use every core of the box
against one PostgreSQL database and one blob store. What must happen once (migrations, the
interrupted blob writes, key files) runs in the parent before the fork; what must not run
twice at once (the sweeper, the notices round) runs in process 0 only; the delivery and webhook
workers run in every process, since their claims are leases taken with `FOR UPDATE SKIP
LOCKED` and settled only by the holder (gateway/store/leases.py).

The supervisor itself does no mail work. It forwards SIGTERM and SIGINT to the children and
waits for them; restarts a child that dies, with backoff; and gives up (exit 1) when a child
dies before it ever became ready, since that is a configuration or environment problem that a
restart loop would only hide. Children ask the kernel (PR_SET_PDEATHSIG) to end them when the
supervisor dies, so a SIGKILLed supervisor leaves no orphans holding the ports.

Linux and other POSIX systems: it needs `os.fork`; the death signal is Linux-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import selectors
import signal
import struct
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.mail.outgoing import Signer
    from sealrelay.serve import Relay

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PID = struct.Struct("=i")  # what a child writes to the ready pipe: its pid (atomic: < PIPE_BUF)

# A child is given (its index, a function to call once it serves) and returns its exit status.
ChildMain = Callable[[int, Callable[[], None]], int]


class StartFailed(Exception):
    """A child died before it was ready: the supervisor stopped the others and exits 1."""


@dataclass
class Backoff:
    """Restart delays: doubling from `first` to `cap`, back to `first` once a child ran for
    `stable` seconds (a crash an hour is not a crash loop)."""

    first: float = 0.5
    cap: float = 30.0
    stable: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2.0 ** min(64, max(0, failures - 1)))


@dataclass
class Slot:
    """One of the N places a child runs in; its index is the child's process number."""

    index: int
    pid: int | None = None
    started: float = 0.0
    ever_ready: bool = False
    failures: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    count: int
    child: ChildMain
    backoff: Backoff = field(default_factory=Backoff)
    stop_timeout: float = 60.0  # then SIGKILL: nothing is lost, unanswered mail is resent
    clock: Callable[[], float] = time.monotonic
    slots: list[Slot] = field(init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("processes must be at least 1")
        self.slots = [Slot(i) for i in range(self.count)]

    def run(self) -> int:
        """Fork the children and supervise them until SIGTERM/SIGINT; the exit status."""
        ready_r, ready_w = os.pipe()
        wake_r, wake_w = os.pipe()
        for fd in (ready_r, wake_r, wake_w):
            os.set_blocking(fd, False)
        previous = {s: signal.signal(s, _note) for s in HANDLED}
        previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        own = (ready_r, ready_w, wake_r, wake_w)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(ready_r, selectors.EVENT_READ)
                selector.register(wake_r, selectors.EVENT_READ)
                inherited = (*own, selector.fileno())
                for slot in self.slots:
                    self._spawn(slot, ready_w, inherited)
                return self._supervise(selector, ready_r, wake_r, ready_w, inherited)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in own:
                os.close(fd)

    def _supervise(
        self,
        selector: selectors.BaseSelector,
        ready_r: int,
        wake_r: int,
        ready_w: int,
        own: tuple[int, ...],
    ) -> int:
        failed: str | None = None
        stop_deadline: float | None = None
        while True:
            now = self.clock()
            timeout = self._next_timeout(now, stop_deadline)
            selector.select(timeout)
            self._read_ready(ready_r)  # before reaping: a child may be ready, then die
            for signum in _drain(wake_r):
                if signum in STOP_SIGNALS and not self._stopping:
                    log.info("supervisor: %s, stopping the processes", _name(signum))
                    stop_deadline = self._stop_children()
            for slot, status in self._reap():
                problem = self._died(slot, status)
                if problem is not None and failed is None and not self._stopping:
                    failed = problem
                    log.error("%s", problem)
                    stop_deadline = self._stop_children()
            if self._stopping:
                if all(slot.pid is None for slot in self.slots):
                    if failed is not None:
                        raise StartFailed(failed)
                    log.info("supervisor: all processes stopped")
                    return 0
                if stop_deadline is not None and self.clock() >= stop_deadline:
                    self._kill_children()
                    stop_deadline = None
                continue
            now = self.clock()
            for slot in self.slots:
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot, ready_w, own)

    def _next_timeout(self, now: float, stop_deadline: float | None) -> float | None:
        moments = [s.restart_at for s in self.slots if s.restart_at is not None and s.pid is None]
        if stop_deadline is not None:
            moments.append(stop_deadline)
        if not moments:
            return None
        return max(0.0, min(moments) - now)

    def _spawn(self, slot: Slot, ready_w: int, own: tuple[int, ...]) -> None:
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        # held until the child has its own handlers: it must not write to our wakeup pipe
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:
            _child(slot.index, self.child, parent, ready_w, own)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        slot.pid, slot.started, slot.restart_at = pid, self.clock(), None
        log.info("supervisor: process %d started (pid %d)", slot.index, pid)

    def _read_ready(self, ready_r: int) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(ready_r, 4096):
                data += chunk
        for (pid,) in _PID.iter_unpack(data[: len(data) - len(data) % _PID.size]):
            for slot in self.slots:
                if slot.pid == pid:
                    slot.ever_ready = True

    def _reap(self) -> list[tuple[Slot, int]]:
        """The children that have ended since the last look, with their wait status."""
        ended: list[tuple[Slot, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for slot in self.slots:
                if slot.pid == pid:
                    ended.append((slot, status))
        return ended

    def _died(self, slot: Slot, status: int) -> str | None:
        """Book a child's end; the reason to give up when it never became ready."""
        lived = self.clock() - slot.started
        slot.pid = None
        how = _describe(status)
        if self._stopping:
            log.info("supervisor: process %d %s", slot.index, how)
            return None
        if not slot.ever_ready:
            return (
                f"process {slot.index} {how} before it was ready, {lived:.1f} s after start;"
                " see its log above. Not restarting: fix the cause and start again"
            )
        slot.failures = 1 if lived >= self.backoff.stable else slot.failures + 1
        wait = self.backoff.delay(slot.failures)
        slot.restart_at = self.clock() + wait
        log.error("supervisor: process %d %s; restarting it in %.1f s", slot.index, how, wait)
        return None

    def _stop_children(self) -> float:
        """SIGTERM to every child; when to SIGKILL the ones still running."""
        self._stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        return self.clock() + self.stop_timeout

    def _kill_children(self) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                log.warning(
                    "supervisor: process %d did not stop in %.0f s; killing it",
                    slot.index,
                    self.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED = (signal.SIGCHLD, *STOP_SIGNALS)


def serve_processes(settings: Settings, roles: Collection[str], count: int) -> None:
    """`sealrelay serve --processes N`: the start-up work here, then N supervised relays.

    Raises StartFailed when a process dies before it serves (the others are stopped first).
    """
    from sealrelay.serve import load_signer, run

    signer = load_signer(settings)  # once: a key that does not load stops it here
    settings = delivery_share(settings, count)

    async def prepare() -> bool:
        relay = _relay(settings, roles, signer)
        try:
            return await relay.prepare()
        finally:
            await relay.blobs.close()
            await relay.db.close()

    if not run(prepare()):  # stopped while waiting for the database
        return

    def child(index: int, ready: Callable[[], None]) -> int:
        async def serve_child() -> None:
            relay = _relay(settings, roles, signer)
            try:
                await relay.serve_forever(
                    prepared=True, singletons=index == 0, reuse_port=True, ready=ready
                )
            finally:
                await relay.stop()

        run(serve_child())
        gc.freeze()  # as `serve` does: the last collections would only delay the exit
        return 0

    log.info("supervisor: starting %d processes; process 0 also sweeps and sends notices", count)
    # What the start-up made stays shared with the children: collections in them would
    # otherwise write to every inherited object and copy its page.
    gc.freeze()
    Supervisor(count, child).run()


def delivery_share(settings: Settings, count: int) -> Settings:
    """`settings` for one of `count` processes: the delivery limits divided among them.

    `[worker] concurrency` and `destination_concurrency` say what a destination may see from
    the relay, and a destination cannot tell processes apart: a provider that allows 10
    connections counts all of them. So each process takes an equal share, rounded down (at
    least 1), and the sum stays within what was configured.
    """
    worker = settings.worker
    if count <= 1:
        return settings
    share = worker.model_copy(
        update={
            "concurrency": max(1, worker.concurrency // count),
            "destination_concurrency": max(1, worker.destination_concurrency // count),
        }
    )
    log.info(
        "supervisor: each of %d processes sends at most %d groups at once, %d to one destination",
        count,
        share.concurrency,
        share.destination_concurrency,
    )
    return settings.model_copy(update={"worker": share})


def _relay(settings: Settings, roles: Collection[str], signer: Signer) -> Relay:
    """A relay that stops on SIGTERM/SIGINT, built in the process that runs it (its workers'
    lease names carry that process's pid), inside its event loop."""
    from sealrelay.serve import Relay

    relay = Relay(settings, roles=roles, signer=signer)
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, relay.request_stop, signal.Signals(signum).name)
    return relay


def _note(signum: int, frame: object) -> None:
    """The signal is read from the wakeup pipe; the handler only has to exist."""


def _drain(fd: int) -> list[int]:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    return list(data)


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {_name(os.WTERMSIG(status))}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _child(index: int, main: ChildMain, parent: int, ready_w: int, own: tuple[int, ...]) -> None:
    """In the forked child: undo the supervisor's signal set-up, die with the parent, run
    `main`, and leave by `os._exit` so that nothing of the parent's stack runs twice."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        for fd in own:
            if fd != ready_w:
                os.close(fd)
        die_with_parent()
        if os.getppid() != parent:  # the supervisor died before the death signal was set
            os._exit(1)

        def ready() -> None:
            os.write(ready_w, _PID.pack(os.getpid()))

        status = main(index, ready)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("process %d failed", index)
    finally:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return True
