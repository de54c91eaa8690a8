"""Where an endpoint may point: the guard against server-side request forgery (SSRF).

Whoever registers an endpoint must not make the relay post into the network it runs in (an
admin interface on loopback, a cloud's metadata service on a link-local address, a database
on a private one). So an endpoint's host is resolved when it is created and again at each
delivery, since DNS can change, and every address it resolves to must be a public one, unless
the admin allowed private ones for that endpoint (an on-premises CRM). At delivery the HTTP
client connects only to the addresses this check passed (`GuardedResolver`), so a name cannot
answer one way to the check and another to the connection. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Final
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.texts.refusals import Refused

SCHEMES: Final = ("http", "https")
URL_LIMIT: Final = 2000

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointUrlError(Refused, ValueError):
    """An endpoint URL that is malformed, or that leads where endpoints may not go."""


class PrivateAddress(EndpointUrlError):
    """A host that resolves to an address only an endpoint allowing private ones may reach."""


class RefusedAddress(OSError):
    """A host that resolved to an address endpoints may not reach (raised at connect time)."""


def refusal(address: Address) -> str | None:
    """Why the relay may not post to `address` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for reason, applies in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not public", not address.is_global),
    ):
        if applies:
            return f"{address} is {reason}"
    return None


def parse(url: str) -> tuple[str, int]:
    """The host and port of an endpoint URL, or EndpointUrlError saying what is wrong."""
    if len(url) > URL_LIMIT:
        raise EndpointUrlError("url.length", maximum=URL_LIMIT)
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise EndpointUrlError("url.spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EndpointUrlError("url.unreadable", reason=str(exc)) from exc
    if parts.scheme not in SCHEMES:
        raise EndpointUrlError("url.scheme")
    if not parts.hostname:
        raise EndpointUrlError("url.no_host")
    if parts.fragment:
        raise EndpointUrlError("url.fragment")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to (a literal address is itself)."""
    address = literal(host)
    if address is not None:
        return [address]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except OSError as exc:
        raise EndpointUrlError("url.unresolved", host=host, reason=str(exc)) from exc
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


async def check(url: str, *, allow_private: bool) -> None:
    """Raise EndpointUrlError unless `url` is well formed and, without `allow_private`, every
    address its host resolves to is public."""
    host, port = parse(url)
    addresses = await resolve(host, port)
    if not addresses:
        raise EndpointUrlError("url.no_address", host=host)
    if allow_private:
        return
    refused = [r for r in map(refusal, addresses) if r]
    if refused:
        raise PrivateAddress("url.private", host=host, reasons="; ".join(refused))


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for endpoints without `allow_private`: public addresses only."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await resolve(host, port)
        except EndpointUrlError as exc:
            raise OSError(str(exc)) from exc
        refused = [r for r in map(refusal, addresses) if r]
        if refused or not addresses:
            raise RefusedAddress(f"{host}: {'; '.join(refused) or 'no address'}")
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET if address.version == 4 else socket.AF_INET6,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None
