"""MTA-STS (RFC 8461): a recipient domain's published demand that mail reach it over TLS
with a valid certificate, and only through the MX hosts it names.

The TXT record `_mta-sts.<domain>` announces a policy and its id; the policy itself is
fetched over verified HTTPS from `https://mta-sts.<domain>/.well-known/mta-sts.txt`, through
the same resolver as the MX lookups. Policies are cached in memory by domain, for their
`max_age`, and fetched again only when the TXT record's id changes (or the cache runs out):
a restart forgets them, which RFC 8461 allows, at the price of one fetch per domain.

When the policy cannot be fetched and none is cached, the domain is treated as having none
(§5.1): MTA-STS protects against a downgrade only once a policy was seen.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.rdatatype
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.outbound.mx_lookup import DnsResolver, DnsTrouble

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024  # §3.2: a policy is small; a bigger answer is not one
MAX_AGE_LIMIT = 31557600  # §3.2: at most a year
_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
MODES = ("enforce", "testing", "none")


@dataclass(frozen=True)
class Policy:
    id: str
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # host patterns: "mx.example.com" or "*.example.com"
    max_age: int  # seconds

    def allows(self, host: str) -> bool:
        """Whether MX host `host` matches one of the policy's patterns (§4.1): a leading
        `*.` stands for exactly one label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def txt_id(records: list[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT records, or None unless exactly one record is an
    STSv1 record with a valid id (§3.1)."""
    versioned = [r for r in records if r.startswith("v=STSv1")]
    if len(versioned) != 1:
        return None
    fields = dict(
        part.strip().partition("=")[::2] for part in versioned[0].split(";") if part.strip()
    )
    found = fields.get("id", "").strip()
    return found if _TXT_ID.match(found) else None


def parse_policy(text: str, policy_id: str) -> Policy:
    """The policy file's fields (§3.2); ValueError saying what is wrong with it."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise ValueError("version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    age = (values.get("max_age") or [""])[0]
    if not age.isdigit() or int(age) > MAX_AGE_LIMIT:
        raise ValueError(f"max_age {age!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    patterns = tuple(p.lower().rstrip(".") for p in values.get("mx", []) if p)
    if mode != "none" and not patterns:
        raise ValueError(f"mode {mode} names no mx")
    return Policy(policy_id, mode, patterns, int(age))


class _PolicyResolver(AbstractResolver):
    """aiohttp's name lookups asked of the relay's resolver, as the MX lookups are."""

    def __init__(self, dns_resolver: DnsResolver) -> None:
        self.dns = dns_resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self.dns.addresses(host)
        except dns.resolver.NXDOMAIN as exc:
            raise OSError(f"{host}: no such name") from exc
        if not addresses:
            raise OSError(f"{host}: no address")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def verified_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trust roots plus `[mx] ca_file`, names checked."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class MtaSts:
    def __init__(
        self,
        dns_resolver: DnsResolver,
        ca_file: Path | None,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dns = dns_resolver
        self.ca_file = ca_file
        self.timeout = timeout
        self.clock = clock
        self._cache: dict[str, tuple[float, Policy]] = {}  # domain -> (expires, policy)
        self._asking: dict[str, asyncio.Future[Policy | None]] = {}

    @functools.cached_property
    def tls_context(self) -> ssl.SSLContext:
        """Read on the first fetch: loading the system's trust roots takes a while."""
        return verified_context(self.ca_file)

    def cached(self, domain: str) -> Policy | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._cache[domain]
            return None
        return entry[1]

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in force, or None (no policy, or none could be had).

        Copies for one domain that ask at the same time share one lookup and fetch."""
        task = self._asking.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._policy(domain))
            self._asking[domain] = task
            task.add_done_callback(lambda _: self._asking.pop(domain, None))
        return await asyncio.shield(task)

    async def _policy(self, domain: str) -> Policy | None:
        cached = self.cached(domain)
        try:
            answer = await self.dns.ask(f"_mta-sts.{domain}", dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, DnsTrouble):
            answer = None
        records = [b"".join(r.strings).decode("ascii", "replace") for r in answer or ()]
        announced = txt_id(records)
        if announced is None or (cached is not None and cached.id == announced):
            return cached  # §5.1: without a record, a cached policy still holds
        try:
            fetched = await self._fetch(domain, announced)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning(
                "MTA-STS policy of %s (id %s) could not be used: %s; %s",
                domain,
                announced,
                exc or type(exc).__name__,
                "using the cached one" if cached else "delivering as if it had none",
            )
            return cached
        self._cache[domain] = (self.clock() + fetched.max_age, fetched)
        return fetched

    async def _fetch(self, domain: str, policy_id: str) -> Policy:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(resolver=_PolicyResolver(self.dns), ssl=self.tls_context)
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session,
            session.get(url, allow_redirects=False) as response,  # §3.3: no redirects
        ):
            if response.status != 200:
                raise ValueError(f"{url} answered HTTP {response.status}")
            if response.content_type != "text/plain":
                raise ValueError(f"{url} is {response.content_type}, not text/plain")
            body = await response.content.read(MAX_POLICY_BYTES + 1)
        if len(body) > MAX_POLICY_BYTES:
            raise ValueError(f"{url} is larger than {MAX_POLICY_BYTES} bytes")
        return parse_policy(body.decode("utf-8", "replace"), policy_id)
