"""One timer for a run of waits, each due at a deadline of its own.

A conversation waits many times (an SMTP session for each command and piece of DATA, an
upstream connection for each reply), and a timer set and cancelled per wait, as
`asyncio.timeout` does, cost more than the rest of the wait. Here a wait only moves the
deadline; the timer is set again only when it would fire too late, and one that fires
before the deadline sets itself for the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Watchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        """`expired` is called once a wait is still under way at its deadline."""
        self._loop = loop
        self._expired = expired
        self._deadline: float | None = None  # loop time; None while nothing is awaited
        self.timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def due_in(self, seconds: float) -> None:
        """A wait begins, or goes on, due `seconds` from now."""
        self._deadline = deadline = self._loop.time() + seconds
        timer = self.timer
        if timer is not None and not timer.cancelled():
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._set(deadline)

    @property
    def waiting(self) -> bool:
        """Whether a wait is under way (a deadline is set)."""
        return self._deadline is not None

    def rest(self) -> None:
        """Nothing is awaited: the timer, when it fires, lapses."""
        self._deadline = None

    def stop(self) -> None:
        self._deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        """Stop for good, letting go of the callback: it is usually a method of the
        watchdog's owner, which would otherwise stay in a reference cycle until the garbage
        collector's next full pass."""
        self.stop()
        self._expired = _nothing

    def _set(self, at: float) -> None:
        self._timer_at = at
        self.timer = self._loop.call_at(at, self._fired)

    def _fired(self) -> None:
        self.timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline > self._timer_at:
            self._set(deadline)
            return
        self._deadline = None
        self._expired()


def _nothing() -> None:
    pass
