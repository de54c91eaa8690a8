"""Manners towards each recipient domain in direct delivery: a few connections at a time,
and a short rest after it could not be reached.

A receiving domain that sees many parallel connections from one unknown sender slows it
down or refuses it; and when its hosts are down, every other copy waiting for it would only
wait for the same timeouts. So at most `per_destination` conversations run per domain (more
copies wait their turn), and after every host of a domain failed at connection level, other
copies for it are deferred at once for `backoff` seconds, saying why. Both live in this
process's memory: several worker processes each keep their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

MAX_REMEMBERED = 10000  # failed domains kept at most; expired ones are dropped first


@dataclass
class _Gate:
    semaphore: asyncio.Semaphore
    users: int = 0  # holding or waiting


class DestinationLimits:
    def __init__(
        self,
        per_destination: int,
        backoff: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_destination = per_destination
        self.backoff = backoff
        self.clock = clock
        self._gates: dict[str, _Gate] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # domain -> (until, why)

    @asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        """One of the domain's connections; waits while all are in use."""
        gate = self._gates.setdefault(domain, _Gate(asyncio.Semaphore(self.per_destination)))
        gate.users += 1
        try:
            async with gate.semaphore:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:  # forget idle domains: the dict stays as small as the traffic
                del self._gates[domain]

    def waiting(self, domain: str) -> int:
        """Copies of `domain` waiting for a connection slot."""
        gate = self._gates.get(domain)
        return 0 if gate is None else max(0, gate.users - self.per_destination)

    def resting(self, domain: str) -> str | None:
        """Why `domain` is not tried now, or None when it may be."""
        entry = self._failed.get(domain)
        if entry is None:
            return None
        until, why = entry
        left = until - self.clock()
        if left <= 0:
            del self._failed[domain]
            return None
        return f"not tried for another {left:.0f} s: the last attempt failed ({why})"

    def failed(self, domain: str, why: str) -> None:
        if self.backoff <= 0:
            return
        now = self.clock()
        if len(self._failed) >= MAX_REMEMBERED:
            self._failed = {d: e for d, e in self._failed.items() if e[0] > now}
            while len(self._failed) >= MAX_REMEMBERED:
                del self._failed[next(iter(self._failed))]
        self._failed[domain] = (now + self.backoff, why)

    def reached(self, domain: str) -> None:
        self._failed.pop(domain, None)
