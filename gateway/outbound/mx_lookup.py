"""Where a recipient domain's mail goes: its MX hosts in preference order (RFC 5321 §5.1),
and each host's addresses, asked of the configured resolver.

An answer that settles the matter for good (the domain does not exist, or publishes a null
MX, RFC 7505) is a permanent `MxLookupError`; a resolver that fails or does not answer in time
is a temporary one, so the copy waits and is tried again.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver


class MxLookupError(Exception):
    """Why no host can be tried; `str()` carries an enhanced status code for the DSN."""

    def __init__(self, error: str, *, permanent: bool) -> None:
        super().__init__(error)
        self.permanent = permanent


class DnsTrouble(Exception):
    """The resolver failed or did not answer in time: nothing is known about the name."""


@dataclass(frozen=True)
class MxHosts:
    hosts: tuple[str, ...]  # MX host names, most preferred first
    implicit: bool = False  # no MX record: the domain itself is the host (RFC 5321 §5.1)


class DnsResolver:
    """dnspython's async resolver on the `[mx] resolver` servers, or the system's; answers
    are cached for their TTL."""

    def __init__(self, servers: list[str], timeout: float) -> None:
        self.servers = servers
        self.timeout = timeout
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:  # read /etc/resolv.conf only when first needed
            if self.servers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [_nameserver(server) for server in self.servers]
            else:
                resolver = dns.asyncresolver.Resolver()
            resolver.cache = dns.resolver.LRUCache()
            self._resolver = resolver
        return self._resolver

    async def ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer | None:
        """The answer, or None when the name exists without records of that type.

        Raises dns.resolver.NXDOMAIN when the name does not exist, DnsTrouble otherwise."""
        try:
            return await self._get().resolve(
                dns.name.from_text(name), rdtype, lifetime=self.timeout, search=False
            )
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTrouble(f"{name} {rdtype.name}: {exc or type(exc).__name__}") from exc

    async def addresses(self, host: str) -> list[str]:
        """IPv4 addresses first, then IPv6: many relays have no IPv6 route. Empty when the
        host has none; DnsTrouble when neither question was answered."""
        answers = await asyncio.gather(
            *(self._addresses(host, kind) for kind in (dns.rdatatype.A, dns.rdatatype.AAAA)),
            return_exceptions=True,
        )
        found = [a for answer in answers if isinstance(answer, list) for a in answer]
        troubles = [answer for answer in answers if isinstance(answer, DnsTrouble)]
        if not found and troubles:
            raise troubles[0]
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, DnsTrouble):
                raise answer
        return found

    async def _addresses(self, host: str, rdtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = await self.ask(host, rdtype)
        except dns.resolver.NXDOMAIN:
            return []
        return [] if answer is None else [rdata.address for rdata in answer]


def _nameserver(server: str) -> dns.nameserver.Nameserver:
    host, _, port = server.rpartition(":")
    return dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))


async def mx_hosts(resolver: DnsResolver, domain: str) -> MxHosts:
    """The hosts to try for `domain`, most preferred first; hosts of equal preference in a
    random order, as RFC 5321 §5.1 asks, to spread the load."""
    try:
        answer = await resolver.ask(domain, dns.rdatatype.MX)
    except dns.resolver.NXDOMAIN as exc:
        raise MxLookupError(f"5.1.2 {domain}: the domain does not exist", permanent=True) from exc
    except DnsTrouble as exc:
        raise MxLookupError(f"4.4.3 MX lookup failed: {exc}", permanent=False) from exc
    if answer is None:
        return MxHosts((domain,), implicit=True)
    records = [(rdata.preference, rdata.exchange.to_text().rstrip(".").lower()) for rdata in answer]
    if any(exchange == "" for _, exchange in records):  # "0 ." is the root name
        raise MxLookupError(
            f"5.1.10 {domain} accepts no mail (it publishes a null MX, RFC 7505)", permanent=True
        )
    shuffle = random.Random()
    ordered = sorted(records, key=lambda record: (record[0], shuffle.random()))
    return MxHosts(tuple(dict.fromkeys(exchange for _, exchange in ordered)))
