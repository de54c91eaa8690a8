"""How many octets of received messages the pipeline holds in memory at once.

The pipeline works on a message as one bytes object. When mail arrives faster than it can
be stored and committed, every session that has read its DATA waits in the pipeline, and
with 20 sessions of 10 MB mail that was 190 MiB of waiting messages (issue 18). Sessions
now wait with their message in the spool file instead, and take it into memory only when
the budget has room, so the memory grows with the budget, not with the sessions.

Waiters are let in in order of arrival, each as soon as it fits, so small mail passes a
big message that waits for room. A message larger than the whole budget goes alone. So that
a waiting message is not passed for ever (a big one behind a steady stream of small mail, or
one larger than the budget, which needs the budget empty), at most the budget's worth of
octets may pass it; after that everything queues behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class _Waiter:
    size: int
    admitted: asyncio.Future[None]
    passed: int = 0  # octets let in ahead of it while it waited


class ByteBudget:
    def __init__(self, octets: int) -> None:
        self.octets = octets
        self.held = 0
        self._waiting: list[_Waiter] = []

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.octets

    def _let_in(self, size: int, ahead: list[_Waiter]) -> bool:
        """Take `size` octets if they fit and may pass every waiter in `ahead`."""
        if not self._fits(size) or any(w.passed + size > self.octets for w in ahead):
            return False
        for waiter in ahead:
            waiter.passed += size
        self.held += size
        return True

    @asynccontextmanager
    async def holding(self, size: int) -> AsyncIterator[None]:
        """Wait until `size` octets fit (or nothing is held); hold them for the block."""
        ahead = [w for w in self._waiting if not w.admitted.done()]
        if not self._let_in(size, ahead):
            waiter = _Waiter(size, asyncio.get_running_loop().create_future())
            self._waiting.append(waiter)
            try:
                await waiter.admitted
            except asyncio.CancelledError:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif not waiter.admitted.cancelled():  # let in, then cancelled before it ran
                    self._release(size)
                raise
        try:
            yield
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.held -= size
        ahead: list[_Waiter] = []
        for waiter in list(self._waiting):
            if waiter.admitted.done():  # cancelled: its task takes it out
                continue
            if self._let_in(waiter.size, ahead):
                self._waiting.remove(waiter)
                waiter.admitted.set_result(None)
            else:
                ahead.append(waiter)
