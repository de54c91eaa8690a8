"""How many octets of received messages the pipeline holds in memory at once.

The pipeline works on a message as one bytes object. When mail arrives faster than it can
be stored and committed, every session that has read its DATA waits in the pipeline, and
with 20 sessions of 10 MB mail that was 190 MiB of waiting messages (issue 18). Sessions
now wait with their message in the spool file instead, and take it into memory only when
the budget has room, so the memory grows with the budget, not with the sessions.

Waiters are let in in order of arrival, each as soon as it fits, so small mail passes a
big message that waits for room. A message larger than the whole budget goes alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    def __init__(self, octets: int) -> None:
        self.octets = octets
        self.held = 0
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.octets

    @asynccontextmanager
    async def holding(self, size: int) -> AsyncIterator[None]:
        """Wait until `size` octets fit (or nothing is held); hold them for the block."""
        if not self._fits(size):
            entry = (size, asyncio.get_running_loop().create_future())
            self._waiting.append(entry)
            try:
                await entry[1]
            except asyncio.CancelledError:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                elif not entry[1].cancelled():  # let in, then cancelled before it ran
                    self._release(size)
                raise
        else:
            self.held += size
        try:
            yield
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.held -= size
        for entry in list(self._waiting):
            if entry[1].done():  # cancelled: its task takes it out
                continue
            if self._fits(entry[0]):
                self._waiting.remove(entry)
                self.held += entry[0]
                entry[1].set_result(None)
