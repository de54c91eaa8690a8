"""DNS questions the console asks about the installation (is the DKIM key published?): a short
timeout, answers remembered for a while, and "unreachable" as an answer rather than an error.

A page that shows the result must stay fast when DNS is slow or absent (an offline install,
a firewall): each question waits `timeout` seconds at most, and a failed one is remembered
too, for less time, so a reload does not wait again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

TIMEOUT = 2.0  # seconds for one question, every try included
REMEMBER_ANSWER = 300.0  # seconds
REMEMBER_FAILURE = 30.0  # seconds


@dataclass(frozen=True)
class TxtAnswer:
    reachable: bool  # False: no server answered in time (nothing is known about the name)
    records: tuple[str, ...] = ()  # each TXT record's strings joined, as a verifier reads it


UNREACHABLE = TxtAnswer(reachable=False)


class DnsLookup:
    """TXT records of a name; `server` (an IP address and port) instead of the system's
    resolver where given. Not `enabled`: the installation asks DNS nothing (pages say so)."""

    def __init__(
        self,
        server: tuple[str, int] | None = None,
        *,
        enabled: bool = True,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.enabled = enabled
        self.timeout = timeout
        self.clock = clock
        self._known: dict[str, tuple[float, TxtAnswer]] = {}
        self._asking: dict[str, asyncio.Task[TxtAnswer]] = {}

    @classmethod
    def configured(cls, enabled: bool, address: str | None) -> DnsLookup:
        """From `[console] dns_checks` and `dns_resolver` ("HOST:PORT", None: the system's)."""
        if address is None:
            return cls(enabled=enabled)
        host, _, port = address.rpartition(":")
        return cls((host.strip("[]"), int(port)), enabled=enabled)

    async def txt(self, name: str) -> TxtAnswer:
        if not self.enabled:
            raise RuntimeError("DNS questions are switched off ([console] dns_checks)")
        key = name.lower().rstrip(".")
        known = self._known.get(key)
        if known is not None and known[0] > self.clock():
            return known[1]
        # one question per name at a time, however many pages ask
        task = self._asking.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(key))
            self._asking[key] = task
            task.add_done_callback(lambda _: self._asking.pop(key, None))
        answer = await asyncio.shield(task)
        remember = REMEMBER_ANSWER if answer.reachable else REMEMBER_FAILURE
        self._known[key] = (self.clock() + remember, answer)
        return answer

    async def _ask(self, name: str) -> TxtAnswer:
        try:
            resolver = self._resolver()
            answer = await resolver.resolve(
                name + ".", dns.rdatatype.TXT, lifetime=self.timeout, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return TxtAnswer(reachable=True)
        except (dns.exception.DNSException, OSError):
            return UNREACHABLE
        return TxtAnswer(
            reachable=True,
            records=tuple(b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer),
        )

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if self.server is None:
            return dns.asyncresolver.Resolver()
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.server[0]]
        resolver.port = self.server[1]
        return resolver
