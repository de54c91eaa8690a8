"""How many prospects' visits may use the database at once.

At 50 visits a second the web took every pooled PostgreSQL connection (and on SQLite queued
without end for the one connection), so delivery's claims, lease renewals and the journal's
sequencer waited 30 s for a connection and failed. A visit therefore runs its database work
under `Admission`: at most `limit` of its transactions at a time, the rest of the pool left to
the relay. A visit that finds no slot within `wait` seconds on its first transaction is
turned away (`Busy`: the web answers 503 with Retry-After) before it has written anything;
once admitted, its later transactions queue for a slot however long, so a visit is never cut
off half way.

The web marks a request as a visit (`visiting`); `Database.transaction` and `snapshot` call
`hold`, which does nothing outside a visit, so the relay's own work never queues here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import Counter

__all__ = ["Admission", "Busy", "hold", "visiting"]

TURNED_AWAY = Counter(
    "sealrelay_web_visits_turned_away_total",
    "prospects' visits answered 503 because the visits' share of the database was in use",
)


class Busy(Exception):
    """Every slot the visits may use is taken: come back later."""


@dataclass
class Admission:
    """`limit` transactions of visits at once; a new visit waits at most `wait` seconds."""

    limit: int
    wait: float
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.limit)


@dataclass
class _Visit:
    admission: Admission
    admitted: bool = False
    holding: bool = False


_visit: ContextVar[_Visit | None] = ContextVar("sealrelay_visit", default=None)


@contextmanager
def visiting(admission: Admission) -> Iterator[None]:
    """Everything the database does inside is a visit's, under `admission`."""
    token = _visit.set(_Visit(admission))
    try:
        yield
    finally:
        _visit.reset(token)


@asynccontextmanager
async def hold() -> AsyncIterator[None]:
    """A slot for one transaction of the current visit; nothing outside a visit, nor for a
    transaction inside one the visit already holds."""
    visit = _visit.get()
    if visit is None or visit.holding:
        yield
        return
    slots = visit.admission.slots
    if visit.admitted:
        await slots.acquire()
    else:
        try:
            await asyncio.wait_for(slots.acquire(), visit.admission.wait)
        except TimeoutError:
            TURNED_AWAY.inc()
            raise Busy("the visits' share of the database is in use") from None
        visit.admitted = True
    visit.holding = True
    try:
        yield
    finally:
        visit.holding = False
        slots.release()
