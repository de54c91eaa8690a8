"""Open upstream connections kept for the next copy to the same destination.

A new connection costs a TCP and TLS handshake, EHLO twice and often AUTH: more CPU than the
copy itself for small mail, and a round trip or five. So after a copy, its connection is kept
idle for the next one (Postfix's smtp_connection_cache_*, docs/connection-cache.md): per
destination (a smart host, an agent's own login, an MX domain with its MTA-STS mode) at most
`connection_cache` idle connections (unset: all of them, which the worker's per-destination
limit bounds, so that the next burst finds every connection the last one opened), each for
`connection_cache_time_limit` seconds idle, and
none used for more than `connection_reuse_count_limit` copies or after
`connection_reuse_time_limit` seconds since it opened. A connection that had any trouble
(a lost reply, a 421, a timeout) is never kept. Closing the cache says QUIT on every kept one.

Idle limits are watched by one timer for the whole cache (gateway/watchdog.py), due at the
oldest kept connection's limit: a timer set at every keep and cancelled at every take cost
more than the rest of the cache's work for each copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import Hashable

from gateway.config import UpstreamSettings
from gateway.outbound.smtp_connection import SmtpConnection
from gateway.watchdog import Watchdog

# A kept connection and the loop time its idle limit ends.
_Kept = tuple[SmtpConnection, float]


class ConnectionCache:
    def __init__(self, settings: UpstreamSettings) -> None:
        self.size = sys.maxsize if settings.connection_cache is None else settings.connection_cache
        self.idle_limit = settings.connection_cache_time_limit
        self.count_limit = settings.connection_reuse_count_limit
        self.age_limit = settings.connection_reuse_time_limit
        self._idle: dict[Hashable, list[_Kept]] = {}  # per key, oldest first
        self._expiries: deque[tuple[Hashable, _Kept]] = deque()  # every keep, oldest first
        self._sweeper: Watchdog | None = None
        self._quitting: set[asyncio.Task[None]] = set()
        self.closed = False

    def take(self, key: Hashable) -> SmtpConnection | None:
        """The most recently used idle connection to `key` still fit for a copy, or None."""
        kept = self._idle.get(key)
        while kept:
            connection, _ = kept.pop()  # its entry in _expiries lapses
            if self._reusable(connection):
                if not kept:
                    del self._idle[key]
                return connection
            self._end(connection)
        self._idle.pop(key, None)
        return None

    def keep(self, key: Hashable, connection: SmtpConnection) -> None:
        """Keep `connection` after a copy, or say QUIT when it is not to be used again."""
        kept = self._idle.setdefault(key, [])
        if self.closed or len(kept) >= self.size or not self._reusable(connection):
            if not kept:
                del self._idle[key]
            self._end(connection)
            return
        loop = asyncio.get_running_loop()
        entry = (connection, loop.time() + self.idle_limit)
        kept.append(entry)
        self._expiries.append((key, entry))
        if self._sweeper is None:
            self._sweeper = Watchdog(loop, self._sweep)
        if not self._sweeper.waiting:  # else it is due at an older connection's limit
            self._sweeper.due_in(self.idle_limit)

    def idle(self, key: Hashable) -> int:
        """How many connections to `key` wait for a copy."""
        return len(self._idle.get(key, ()))

    async def close(self) -> None:
        """QUIT on every idle connection, and on each one handed back from now on; returns
        once the upstreams answered (or a few seconds passed)."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.close()
        for kept in self._idle.values():
            for connection, _ in kept:
                self._end(connection)
        self._idle.clear()
        self._expiries.clear()
        while self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)

    def _reusable(self, connection: SmtpConnection) -> bool:
        return (
            connection.alive
            and connection.messages < self.count_limit
            and time.monotonic() - connection.opened_at < self.age_limit
        )

    def _sweep(self) -> None:
        """QUIT on the connections idle past their limit; then due at the next one's.

        Keeps and expiries go oldest first, and take() pops the newest, so a connection
        still kept when its expiry comes round is its key's oldest: an expiry whose
        connection was taken meanwhile finds another entry first, or none, and lapses."""
        assert self._sweeper is not None
        now = asyncio.get_running_loop().time()
        while self._expiries:
            key, entry = self._expiries[0]
            if entry[1] > now:
                self._sweeper.due_in(entry[1] - now)
                return
            self._expiries.popleft()
            kept = self._idle.get(key)
            if kept and kept[0] is entry:
                del kept[0]
                if not kept:
                    del self._idle[key]
                self._end(entry[0])

    def _end(self, connection: SmtpConnection) -> None:
        """QUIT in the background when the connection can still hear it, else just close."""
        if not connection.alive:
            connection.close()
            return
        task = asyncio.get_running_loop().create_task(connection.quit())
        self._quitting.add(task)
        task.add_done_callback(self._quit_done)

    def _quit_done(self, task: asyncio.Task[None]) -> None:
        self._quitting.discard(task)
        with contextlib.suppress(asyncio.CancelledError):
            task.exception()  # retrieved: a failed QUIT is no news
