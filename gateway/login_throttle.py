"""Failed logins, counted per client address and per account, for every way to sign in.

SMTP AUTH and the web console check the same passwords, so they share one count: a guesser
who is turned away by the SMTP front must not get fresh tries at the console's sign-in form,
nor the other way round. The composition root makes one `LoginThrottle` and hands it to both;
it lives here, beside neither, so that the fronts and the console need not know each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gateway.config import SmtpSettings


class FailedLogins:
    """Failed logins per client address, across connections: a leaky bucket.

    Each failure adds one; one leaks away every `forget_seconds`. At `budget` the address is
    refused before any password is checked, so guessing costs the relay no argon2 time and a
    login from elsewhere is not queued behind the guesses. A success does not empty the
    bucket: one known account must not buy an attacker fresh guesses.
    """

    MAX_ADDRESSES = 100_000  # beyond this, addresses whose bucket has leaked empty are dropped
    TRUST_SECONDS = 86_400.0  # an address with a login this recent goes ahead of all others

    def __init__(
        self, budget: int, forget_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.budget = budget
        self.forget_seconds = forget_seconds
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (level, at)
        self._logged_in: dict[str, float] = {}  # address -> time of its last good login
        self._checking: Counter[str] = Counter()  # address -> logins being checked now

    def level(self, address: str) -> float:
        """Recent failures from `address`, leaked down to now."""
        level, at = self._buckets.get(address, (0.0, 0.0))
        return max(0.0, level - (self.clock() - at) / self.forget_seconds)

    def priority(self, address: str) -> float:
        """Lower goes first to the password check: where agents logged in lately, then
        addresses with a clean record, then by how much each has failed.

        A first guess from a fresh address looks like an agent's first login; an address an
        agent used yesterday does not look like a guesser's.
        """
        return self.level(address) - (1 if self.trusted(address) else 0)

    def record_login(self, address: str) -> None:
        self._logged_in[address] = self.clock()
        if len(self._logged_in) > self.MAX_ADDRESSES:
            cutoff = self.clock() - self.TRUST_SECONDS
            self._logged_in = {a: t for a, t in self._logged_in.items() if t > cutoff}

    def over_budget(self, address: str) -> bool:
        """True from the `budget`-th failure until a whole one has leaked away."""
        return self.level(address) > self.budget - 1

    def full(self, address: str) -> bool:
        """Whether the logins being checked now, were they all to fail, would reach the
        budget: a further check must wait for one of them to end, or fifty connections from
        one address could each start a guess before the first failure is recorded."""
        return self.level(address) + self._checking[address] > self.budget - 1

    @contextlib.contextmanager
    def checking(self, address: str) -> Iterator[None]:
        self._checking[address] += 1
        try:
            yield
        finally:
            self._checking[address] -= 1
            if self._checking[address] <= 0:
                del self._checking[address]

    def record(self, address: str) -> None:
        self._buckets[address] = (self.level(address) + 1, self.clock())
        if len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets = {a: v for a, v in self._buckets.items() if self.level(a) > 0}

    def trusted(self, address: str) -> bool:
        """Whether a login from `address` succeeded within TRUST_SECONDS."""
        seen = self._logged_in.get(address)
        return seen is not None and self.clock() - seen < self.TRUST_SECONDS


class _Ended:
    """Wakes whoever waits for a password check to end."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


TURN_LIMIT = 30.0  # seconds a login waits for its turn before it hears "try again later"


@dataclass(frozen=True)
class LoginThrottle:
    """The per-address and the per-account buckets, shared by SMTP AUTH and the console.

    An account over its budget is refused from every address except one where a login
    succeeded lately: a guesser spread over many addresses is stopped, and cannot lock an
    agent out of the office they always sign in from.
    """

    per_address: FailedLogins
    per_account: FailedLogins
    _ended: _Ended = field(default_factory=_Ended, compare=False)

    @classmethod
    def from_settings(
        cls, smtp: SmtpSettings, clock: Callable[[], float] = time.monotonic
    ) -> LoginThrottle:
        return cls(
            FailedLogins(smtp.max_auth_failures_per_ip, smtp.auth_failure_forget, clock),
            FailedLogins(smtp.max_auth_failures_per_account, smtp.auth_failure_forget, clock),
        )

    def address_refused(self, address: str) -> bool:
        return self.per_address.over_budget(address)

    def account_refused(self, address: str, account: str) -> bool:
        return self.per_account.over_budget(account_key(account)) and not self.per_address.trusted(
            address
        )

    def refused(self, address: str, account: str) -> bool:
        return self.address_refused(address) or self.account_refused(address, account)

    async def wait_turn(self, address: str, account: str, limit: float = TURN_LIMIT) -> None:
        """Wait while the address's or the account's budget is taken up by logins still being
        checked, not by failures; then the caller asks `refused` and starts its check.

        A CRM opening twenty sessions at once with the right password waits a moment
        instead of hearing "too many failed logins"; twenty parallel guesses still get no
        more checks than the budget, as the waiting ones find the failures recorded.
        TimeoutError after `limit` seconds.
        """
        key = account_key(account)
        async with asyncio.timeout(limit):
            while self._waits(self.per_address, address) or (
                self._waits(self.per_account, key) and not self.per_address.trusted(address)
            ):
                await self._ended.wait()

    @staticmethod
    def _waits(bucket: FailedLogins, key: str) -> bool:
        return bucket.full(key) and not bucket.over_budget(key)

    def priority(self, address: str) -> float:
        return self.per_address.priority(address)

    @contextlib.contextmanager
    def checking(self, address: str, account: str) -> Iterator[None]:
        try:
            with (
                self.per_address.checking(address),
                self.per_account.checking(account_key(account)),
            ):
                yield
        finally:
            self._ended.notify()

    def failed(self, address: str, account: str) -> None:
        self.per_address.record(address)
        self.per_account.record(account_key(account))

    def succeeded(self, address: str) -> None:
        self.per_address.record_login(address)


def account_key(login: str) -> str:
    """The login as the user table compares it, cut short so junk cannot fill memory."""
    return login.strip().lower()[:320]
