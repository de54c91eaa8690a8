"""A supervisor over stand-in children, run as its own process by tests/relay/test_supervisor.py.

`python -m tests.relay.supervised BEHAVIOUR COUNT`: each child prints `ready INDEX PID` once it
serves and `stopped INDEX PID` when SIGTERM ended it; the supervisor's exit status is this
process's. Behaviours: `serve` (every child serves until SIGTERM), `fail-at-start` (child 1
exits 3 before it is ready), `stubborn` (children ignore SIGTERM: the supervisor must SIGKILL).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from sealrelay.processes import Backoff, StartFailed, Supervisor


def say(line: str) -> None:
    """One write per line, so that lines of several children never interleave."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def child_for(behaviour: str) -> Callable[[int, Callable[[], None]], int]:
    def child(index: int, ready: Callable[[], None]) -> int:
        if behaviour == "fail-at-start" and index == 1:
            return 3
        waited = {signal.SIGTERM}
        if behaviour == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            waited = {signal.SIGUSR1}  # never sent: only SIGKILL ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        ready()  # first: once the test reads the line, the supervisor knows it too
        say(f"ready {index} {os.getpid()}")
        signal.sigwait(waited)
        say(f"stopped {index} {os.getpid()}")
        return 0

    return child


def main() -> int:
    behaviour, count = sys.argv[1], int(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="[%(process)d] %(message)s", stream=sys.stderr)
    supervisor = Supervisor(
        count,
        child_for(behaviour),
        backoff=Backoff(first=0.1, cap=0.4, stable=60),
        stop_timeout=1.0,
    )
    try:
        return supervisor.run()
    except StartFailed as exc:
        say(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
