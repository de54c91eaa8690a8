"""The PROXY protocol (v1 text and v2 binary) in front of the SMTP listeners.

HAProxy, relaying TCP, would otherwise make every client look like the proxy: one address for
the per-address connection limit and login throttle, and the proxy in Received lines. aiosmtpd
reads and parses the header itself (`proxy_protocol_timeout`); this module decides whom to
believe and what the header means for us. Like Postfix's `smtpd_upstream_proxy_protocol`, a
listener with the protocol on requires the header, and closes a connection without a valid
one without a word; unlike Postfix, only peers in `proxy_from` may send it at all, so a
client that reaches the port directly cannot claim to be someone else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, ProxyData

from gateway.config import SmtpSettings

Peer = tuple[str, int]


@dataclass(frozen=True)
class ProxyPolicy:
    """Who may send a PROXY header, and how long we wait for it."""

    networks: tuple[IPv4Network | IPv6Network, ...]
    timeout: float

    @classmethod
    def from_settings(cls, smtp: SmtpSettings) -> ProxyPolicy | None:
        if not smtp.proxy_protocol:
            return None
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in smtp.proxy_from)
        return cls(networks, min(smtp.proxy_timeout, smtp.timeout))

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def proxied_client(data: ProxyData, peer: object) -> Peer | None:
    """The client the header names; the proxy itself where the header says "no client"
    (v1 UNKNOWN, v2 LOCAL: HAProxy's own health checks), as the specification asks;
    None for a header we refuse (invalid, UDP, a Unix socket)."""
    if not data.valid:
        return None
    if (data.version == 2 and data.command == V2_CMD.LOCAL) or data.family == AF.UNSPEC:
        if not isinstance(peer, tuple):
            return None
        return str(peer[0]), int(peer[1])
    if data.protocol != PROTO.STREAM or data.family not in (AF.INET, AF.INET6):
        return None
    source = data.src_addr
    if not isinstance(source, IPv4Address | IPv6Address) or data.src_port is None:
        return None
    if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped  # one client, one key for the limits, whichever stack
    return str(source), int(data.src_port)
