"""Who is asking: the peer address, or what our own reverse proxies say the client was.

`X-Forwarded-For` is only believed when the TCP peer is one of `web.trusted_proxies`
(addresses or CIDR networks). Then the header is read from the right, skipping our own
proxies; the first address that is not one of them is the client. Anything to the left of it
was written by the client itself and may be forged, so it is never used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = "unknown"


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`trusted_proxies` entries as networks; a bare address is a /32 or /128."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(
                f"web.trusted_proxies: {entry!r} is not an IP address or network"
            ) from exc
    return tuple(networks)


def parse_address(value: str) -> Address | None:
    """An address as found in a peer name or a forwarded header; ports and brackets go."""
    value = value.strip().strip('"')
    if value.startswith("["):  # [2001:db8::1]:443
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # 192.0.2.1:443
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientIpResolver:
    """Built once from the settings; `resolve` is called per request."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self.trusted = parse_networks(trusted_proxies)

    def is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str:
        """The client's address; `forwarded_for` holds every X-Forwarded-For value in order."""
        peer_address = parse_address(peer) if peer else None
        if peer_address is None:
            return peer or UNKNOWN
        if not self.is_trusted(peer_address):
            return str(peer_address)
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        client = peer_address
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                # Garbage in the chain: stop at the last address a trusted hop vouched for.
                break
            client = address
            if not self.is_trusted(address):
                break
        return str(client)
