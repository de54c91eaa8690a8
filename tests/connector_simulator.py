"""A Microsoft 365 / Google Workspace stand-in: a real SMTP server with a smart-host rule.

Like the platform, it takes the agents' mail on one listener and sealrelay's copies on
another (its inbound connector), and routes each message by its mail flow rule:

- `correct`: a message from sealrelay's connector that carries the X-Sealrelay-Loop field
  goes to the internet; everything else goes to sealrelay (docs/microsoft-365.md).
- `everything`: the broken rule, every message goes to sealrelay, its own copies included.

It forwards over STARTTLS with a client certificate from the given CA, from a chosen
loopback address, and when sealrelay refuses a message it writes a bounce (an NDR) to the
sender, as the platform does. A pass counter per Message-ID bounds any loop: a message
seen more than `max_passes` times is bounced by the simulator itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from email.utils import formatdate

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.mail import headers
from gateway.mail.loop_mark import LOOP_HEADER
from tests.pki import Issued, tls_client
from tests.support import Sink, free_port

TIMEOUT = 15


@dataclass
class Bounce:
    to: str
    message_id: str
    reason: str


@dataclass
class Forward:
    """One pass to sealrelay: the Message-ID, and sealrelay's reply."""

    message_id: str
    reply: str


class _Listener:
    def __init__(self, simulator: ConnectorSimulator, from_relay: bool) -> None:
        self.simulator, self.from_relay = simulator, from_relay

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None and envelope.mail_from is not None
        self.simulator.accept(
            envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, self.from_relay
        )
        return "250 2.6.0 Queued mail for delivery"


@dataclass
class ConnectorSimulator:
    internet: Sink
    relay_port: int
    certificate: Issued
    source: str = "127.0.0.5"
    rule: str = "correct"
    max_passes: int = 3
    agents_port: int = 0
    inbound_port: int = 0
    forwards: list[Forward] = field(default_factory=list)
    bounces: list[Bounce] = field(default_factory=list)
    _passes: dict[str, int] = field(default_factory=dict)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _work: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> ConnectorSimulator:
        loop = asyncio.get_running_loop()
        self.agents_port, self.inbound_port = free_port(), free_port()
        for port, from_relay in ((self.agents_port, False), (self.inbound_port, True)):
            handler = _Listener(self, from_relay)
            self._servers.append(
                await loop.create_server(
                    lambda h=handler: SMTP(h, hostname="m365.test", decode_data=False),
                    "127.0.0.1",
                    port,
                )
            )
        return self

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for task in list(self._work):
            task.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)

    def accept(self, sender: str, recipients: list[str], data: bytes, from_relay: bool) -> None:
        """Queued, as the platform queues: routed in a task of its own after the 250."""
        task = asyncio.create_task(self._route(sender, recipients, data, from_relay))
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _route(
        self, sender: str, recipients: list[str], data: bytes, from_relay: bool
    ) -> None:
        fields = headers.fields_of(data)
        message_id = headers.first_value(fields, "message-id") or ""
        marked = headers.first_value(fields, LOOP_HEADER) is not None
        self._passes[message_id] = self._passes.get(message_id, 0) + 1
        if self._passes[message_id] > self.max_passes:
            await self._bounce(sender, message_id, "hop count exceeded - possible mail loop")
        elif self.rule == "correct" and marked and from_relay:
            await aiosmtplib.send(
                data,
                sender=sender,
                recipients=recipients,
                hostname="127.0.0.1",
                port=self.internet.port,
                timeout=TIMEOUT,
            )
        else:
            await self.to_relay(sender, recipients, data, message_id)

    async def to_relay(
        self, sender: str, recipients: list[str], data: bytes, message_id: str
    ) -> None:
        """One pass to sealrelay's trusted listener; a refusal becomes a bounce."""
        trace = f"Received: from m365.test by m365.test with ESMTPS; {formatdate()}\r\n"
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.relay_port,
            source_address=(self.source, 0),
            start_tls=True,
            tls_context=tls_client(self.certificate),
            timeout=TIMEOUT,
        )
        try:
            async with client:
                _, reply = await client.sendmail(sender, recipients, trace.encode() + data)
            answer = f"250 {reply}"
        except aiosmtplib.SMTPResponseException as exc:
            answer = f"{exc.code} {exc.message}"
        await self._record(Forward(message_id, answer))
        if not answer.startswith("2"):
            await self._bounce(sender, message_id, answer)

    async def _bounce(self, sender: str, message_id: str, reason: str) -> None:
        await self._record(Bounce(sender, message_id, reason))

    async def _record(self, item: Forward | Bounce) -> None:
        async with self._changed:
            if isinstance(item, Forward):
                self.forwards.append(item)
            else:
                self.bounces.append(item)
            self._changed.notify_all()

    async def wait_for(self, *, forwards: int = 0, bounces: int = 0) -> None:
        """Until at least this many passes to sealrelay and bounces happened (bounded)."""
        async with asyncio.timeout(30):
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self.forwards) >= forwards and len(self.bounces) >= bounces
                )

    async def idle(self) -> None:
        """Until every message taken in so far is routed."""
        async with asyncio.timeout(30):
            while self._work:
                await asyncio.gather(*list(self._work), return_exceptions=True)

    async def submit(self, sender: str, recipients: list[str], data: bytes) -> None:
        """An agent's mail program hands a message to the platform."""
        await aiosmtplib.send(
            data,
            sender=sender,
            recipients=recipients,
            hostname="127.0.0.1",
            port=self.agents_port,
            timeout=TIMEOUT,
        )
