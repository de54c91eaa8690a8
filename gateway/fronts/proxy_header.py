"""The PROXY protocol (v1 text and v2 binary) in front of the SMTP listeners.

HAProxy, relaying TCP, would otherwise make every client look like the proxy: one address for
the per-address connection limit and login throttle, and the proxy in Received lines. The
front finds the header's bounds in what it received (`header_length`) and has aiosmtpd's
parser read it (`parse_header`); this module also decides whom to believe and what the
header means for us. Like Postfix's `smtpd_upstream_proxy_protocol`, a
listener with the protocol on requires the header, and closes a connection without a valid
one without a word; unlike Postfix, only peers in `proxy_from` may send it at all, so a
client that reaches the port directly cannot claim to be someone else.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, V2_SIGNATURE, ProxyData, get_proxy

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


V1_LONGEST = 107  # octets of a v1 header, CRLF included (the specification's bound)
_V2_FIXED = 16  # a v2 header's signature, version, family and length


def header_length(buffer: bytes | bytearray) -> int | None:
    """How many octets at the start of `buffer` are the PROXY header: None while more are
    needed to tell, 0 for octets that can be no header. The header's bounds are found
    here, so that what follows it (the first command, a TLS ClientHello) stays ours."""
    if len(buffer) < 5 and b"PROXY".startswith(buffer):
        return None
    if buffer.startswith(b"PROXY"):
        end = buffer.find(b"\n", 0, V1_LONGEST)
        if end == -1:
            return None if len(buffer) < V1_LONGEST else 0
        return end + 1
    signature = V2_SIGNATURE[: len(buffer)]
    if not buffer.startswith(signature):
        return 0
    if len(buffer) < _V2_FIXED:
        return None
    total = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
    return total if len(buffer) >= total else None


def parse_header(header: bytes) -> ProxyData:
    """The header `header_length` found, read by aiosmtpd's parser. Its reader is given
    the header's octets only, so its awaits never wait and it ends at its first step."""
    reading = get_proxy(_Octets(header))
    try:
        reading.send(None)
    except StopIteration as done:
        result: ProxyData = done.value
        return result
    reading.close()
    return ProxyData(version=None).with_error("PROXY header cut short")


class _Octets:
    """aiosmtpd's AsyncReader over octets already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def _take(self, size: int) -> bytes:
        taken, self._data = self._data[:size], self._data[size:]
        return taken

    async def read(self, n: int = -1) -> bytes:
        return self._take(len(self._data) if n < 0 else n)

    async def readexactly(self, n: int) -> bytes:
        if len(self._data) < n:
            raise asyncio.IncompleteReadError(self._data, n)
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        end = self._data.find(separator)
        if end == -1:
            raise asyncio.IncompleteReadError(self._data, None)
        return self._take(end + len(separator))
