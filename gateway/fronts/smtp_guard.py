"""Limits that keep one client, or a flood of them, from taking the SMTP front from everyone.

Idle connections used to pile up until the process ran out of file descriptors: then nobody
could connect and asyncio logged `accept() out of system resource` many times a second. Now
each client address may hold `max_connections_per_ip` sessions (Postfix's default is 50),
all together stay below the descriptor limit, and an address that failed too many logins,
over any number of connections, is turned away before a password is checked. Refusals are
421 at the greeting, as Postfix gives them; the log gets one line per kind per minute.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from weakref import WeakSet

from gateway.config import SmtpSettings
from gateway.login_throttle import FailedLogins

log = logging.getLogger(__name__)

LOG_INTERVAL = 60.0  # seconds between two lines about the same kind of refusal
# Descriptors kept for everything that is not an SMTP session: database connections, blob
# files, the web listener and its clients, the upstream connections.
FD_RESERVE_MIN = 64
FD_RESERVE_SHARE = 5  # and at least a fifth of the limit


class Refusal:
    """What a client hears instead of the greeting."""

    TOO_MANY_FROM_HERE = "421 4.7.0 Too many connections from your address; try again later"
    BUSY = "421 4.3.2 Too many connections; try again later"
    FAILED_LOGINS = "421 4.7.0 Too many failed logins from your address; try again later"


@dataclass
class _Mark:
    at: float
    left_out: int = 0


class ThrottledLog:
    """At most one line per kind of event per interval, saying how many were left out.

    A flood is one event repeated; a line per repetition fills disks (176 MB in two minutes
    was measured) and hides everything else.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._marks: dict[str, _Mark] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self.clock()
        mark = self._marks.get(kind)
        if mark is not None and now - mark.at < self.interval:
            mark.left_out += 1
            return
        if mark is not None and mark.left_out:
            message += f" (and {mark.left_out} more like it in the last {self.interval:.0f} s)"
        self.logger.warning(message, *args)
        self._marks[kind] = _Mark(now)


class ThrottledRecords(logging.Filter):
    """Lets one record starting with `prefix` through per interval; others pass untouched.

    For lines written by code that is not ours: asyncio logs `socket.accept() out of system
    resource` with a traceback each time it retries accepting.
    """

    def __init__(
        self,
        prefix: str,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self._mark: _Mark | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        now = self.clock()
        if self._mark is not None and now - self._mark.at < self.interval:
            self._mark.left_out += 1
            return False
        if self._mark is not None and self._mark.left_out:
            record.msg = (
                f"{record.getMessage()} (and {self._mark.left_out} more like it"
                f" in the last {self.interval:.0f} s)"
            )
            record.args = None
        self._mark = _Mark(now)
        return True


ACCEPT_FAILURES = ThrottledRecords("socket.accept() out of system resource")
logging.getLogger("asyncio").addFilter(ACCEPT_FAILURES)


class IdleSession(Protocol):
    def shorten_idle(self) -> None: ...


class ConnectionGate:
    """Counts open sessions, per client address and in all, and admits or refuses new ones.

    From three quarters full on, sessions that have not logged in may stay silent only
    `busy_timeout` seconds (Postfix's stress mode): idle connections from many addresses
    would otherwise hold every place for the full timeout and lock the agents out.
    """

    def __init__(self, settings: SmtpSettings, failed_logins: FailedLogins, total: int) -> None:
        self.per_address = settings.max_connections_per_ip
        self.busy_timeout = settings.busy_timeout
        self.total = total
        self.failed_logins = failed_logins
        self.open: Counter[str] = Counter()
        self.open_total = 0  # the sum of `open`, kept: every command asks under_stress
        self.sessions: WeakSet[IdleSession] = WeakSet()
        self.refusals = ThrottledLog(log)

    @property
    def under_stress(self) -> bool:
        return self.open_total >= max(1, self.total * 3 // 4)

    def enter(self, session: IdleSession) -> None:
        """An admitted session; the one that brings stress shortens everyone's idle time."""
        self.sessions.add(session)
        if self.open_total == max(1, self.total * 3 // 4):
            self.refusals.warning(
                "stress",
                "%d of %d SMTP sessions open: sessions not logged in get %.0f s of silence",
                self.open_total,
                self.total,
                self.busy_timeout,
            )
            for other in list(self.sessions):
                other.shorten_idle()

    def admit(self, address: str) -> str | None:
        """None and the session is counted, or the reply that refuses it."""
        if self.failed_logins.over_budget(address):
            self.refusals.warning(
                "failed-logins", "refused a connection from %s: too many failed logins", address
            )
            return Refusal.FAILED_LOGINS
        if self.open_total >= self.total:
            self.refusals.warning(
                "total", "refused a connection from %s: %d sessions open", address, self.total
            )
            return Refusal.BUSY
        if self.open[address] >= self.per_address:
            self.refusals.warning(
                "per-address",
                "refused a connection from %s: it has %d sessions open",
                address,
                self.per_address,
            )
            return Refusal.TOO_MANY_FROM_HERE
        self.open[address] += 1
        self.open_total += 1
        return None

    def release(self, address: str, session: IdleSession) -> None:
        self.sessions.discard(session)
        self.open[address] -= 1
        self.open_total -= 1
        if self.open[address] <= 0:
            del self.open[address]


def session_ceiling(configured: int) -> int:
    """`configured`, lowered to what the file-descriptor limit leaves room for.

    The soft limit is first raised to the hard one, as servers do. Reaching the limit is
    what locked every agent out: asyncio then cannot accept anything, not even to refuse it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    room = soft - max(FD_RESERVE_MIN, soft // FD_RESERVE_SHARE)
    if room < 1:
        raise RuntimeError(
            f"smtp.max_connections: the file-descriptor limit (ulimit -n) is {soft};"
            " raise it to accept SMTP sessions"
        )
    if configured > room:
        log.warning(
            "smtp.max_connections %d lowered to %d: the file-descriptor limit is %d",
            configured,
            room,
            soft,
        )
    return min(configured, room)
