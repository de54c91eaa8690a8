"""How many conversations the delivery worker holds with one destination at a time.

A single total limit lets a burst to one destination (Microsoft 365, Google, one MX domain,
one smart host) take every slot: the destination sees more parallel connections than it
accepts from one sender and throttles or refuses them. So, as Postfix's
`default_destination_concurrency_limit` does, sends to one destination (a smart host with
its login, an agent's own login, an MX domain) run at most `limit` at once, and the worker's
total (`[worker] concurrency`) is shared by all destinations. A copy waiting for a busy
destination waits here, before taking a total slot, so other destinations' copies pass it.

Feedback, simplified from Postfix's: after a send in which the destination took nothing and
refused nothing for good (every recipient deferred: it could not be reached, broke off, said
421 or 4xx), its limit is 1 until a send succeeds, so a destination in trouble is probed by
one conversation instead of hit by ten. A destination nothing runs or waits for is forgotten,
its feedback with it: it starts again at its full limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Gate:
    limit: int
    running: int = 0
    throttled: bool = False  # its last send failed: one at a time until one succeeds
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    @property
    def room(self) -> bool:
        return self.running < (1 if self.throttled else self.limit)


class DestinationGates:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._gates: dict[Hashable, _Gate] = {}

    @asynccontextmanager
    async def slot(self, key: Hashable, limit: int | None = None) -> AsyncIterator[None]:
        """One of the destination's conversations; waits, first come first served, while
        all are in use. `limit`: the destination's own lower limit, if it has one."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(min(self.limit, limit or self.limit))
        await self._enter(key, gate)
        try:
            yield
        finally:
            gate.running -= 1
            self._admit(key, gate)

    def succeeded(self, key: Hashable) -> None:
        """The destination took or refused copies: back to its full limit."""
        gate = self._gates.get(key)
        if gate is not None and gate.throttled:
            gate.throttled = False
            self._admit(key, gate)

    def failed(self, key: Hashable) -> None:
        """The destination deferred a whole send: one conversation at a time from now."""
        gate = self._gates.get(key)
        if gate is not None:
            gate.throttled = True

    def running(self, key: Hashable) -> int:
        gate = self._gates.get(key)
        return 0 if gate is None else gate.running

    def waiting(self, key: Hashable) -> int:
        gate = self._gates.get(key)
        return 0 if gate is None else len(gate.waiters)

    def throttled(self, key: Hashable) -> bool:
        gate = self._gates.get(key)
        return gate is not None and gate.throttled

    async def _enter(self, key: Hashable, gate: _Gate) -> None:
        if gate.room and not gate.waiters:
            gate.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        gate.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # admitted as it was cancelled
                gate.running -= 1
            else:
                gate.waiters.remove(turn)
            self._admit(key, gate)
            raise

    def _admit(self, key: Hashable, gate: _Gate) -> None:
        """Let waiters in while there is room; forget the gate once nobody needs it."""
        while gate.waiters and gate.room:
            turn = gate.waiters.popleft()
            if turn.done():
                continue
            gate.running += 1
            turn.set_result(None)
        if gate.running == 0 and not gate.waiters:
            self._gates.pop(key, None)
