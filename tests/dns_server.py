"""A tiny authoritative DNS server on loopback for the tests: TXT records from a dict (and
records of any type from another), NXDOMAIN for every other name, and a count of the
questions it was asked.

Built on dnspython's own message parsing, so the relay's resolver talks real DNS over UDP to
it, as it would to the brokerage's resolver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class TinyDns(asyncio.DatagramProtocol):
    def __init__(
        self,
        zone: dict[str, Sequence[Sequence[str]]],
        records: dict[tuple[str, str], Sequence[str]] | None = None,
        failing: frozenset[str] = frozenset(),
    ) -> None:
        """`zone`: name -> its TXT records, each a sequence of strings (<= 255 each).
        `records`: (name, type) -> records of any type in zone-file text ("10 mx1.a.test.",
        "127.0.0.2"); a name there without the type asked answers with no records.
        `failing`: names whose every question gets SERVFAIL."""
        self.zone = {name.lower().rstrip("."): records for name, records in zone.items()}
        self.records = {
            (name.lower().rstrip("."), kind.upper()): texts
            for (name, kind), texts in (records or {}).items()
        }
        self.failing = {name.lower().rstrip(".") for name in failing}
        self.questions: list[str] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # a datagram transport, though not of that class

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        self.questions.append(name)
        kind = dns.rdatatype.to_text(question.rdtype)
        if name in self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, kind) in self.records:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 300, "IN", kind, self.records[name, kind])
            )
        elif any(known == name for known, _ in self.records):
            pass  # the name exists, without records of that type
        elif name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT and self.zone[name]:
            texts = [" ".join(f'"{part}"' for part in strings) for strings in self.zone[name]]
            response.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", "TXT", texts))
        self.transport.sendto(response.to_wire(), addr)


@asynccontextmanager
async def tiny_dns(
    zone: dict[str, Sequence[Sequence[str]]],
    records: dict[tuple[str, str], Sequence[str]] | None = None,
    failing: frozenset[str] = frozenset(),
) -> AsyncIterator[tuple[TinyDns, int]]:
    """The server and its UDP port on 127.0.0.1."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: TinyDns(zone, records, failing), local_addr=("127.0.0.1", 0)
    )
    try:
        yield server, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


@asynccontextmanager
async def silent_port() -> AsyncIterator[int]:
    """A UDP port on loopback that reads questions and never answers: DNS out of reach."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()
