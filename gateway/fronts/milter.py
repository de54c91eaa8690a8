"""The milter front: Postfix (or Sendmail) stays in charge and asks the relay about each message.

At the end of a message the pipeline decides. When every recipient gets the original (no
link, no letter), the relay journals the message, adds its `X-Sealrelay` header and lets the
MTA deliver it. When recipients need different copies, the relay takes the message over:
it commits the message and its copies in its own queue (the same commit the SMTP front
makes before 250) and only then tells the MTA to discard its own; the relay's upstream
delivers the copies. A refusal by policy is the SMTP front's reply; anything that goes wrong
inside is a 4xx, never an accept that loses mail. Nothing is kept of a message the MTA
abandons before its end. docs/postfix.md ("Milter") is the operator's side of this.

Who sends: a login the MTA reports (`{auth_authen}`) that is an agent's address or alias is
that agent; other mail is the `[milter]` service's, which sends for the domains we serve, as
a trusted smart-host client does (gateway/fronts/trusted.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from gateway import users
from gateway.config import Settings, TrustedClient
from gateway.fronts import milter_protocol as mp
from gateway.fronts import trusted
from gateway.fronts.listen_addresses import split_address
from gateway.fronts.smtp import Reply
from gateway.fronts.trusted import TrustedEntry, TrustedMatch
from gateway.intake.pipeline import (
    STRIPPED_FIELDS,
    Envelope,
    Origin,
    Pipeline,
    TrustedOrigin,
    may_use_sender,
)
from gateway.rejections import Rejected
from gateway.store.blobs import StoreUnavailable
from gateway.store.db import Database
from gateway.store.events import MESSAGE_MILTER, MessageMilter
from gateway.store.health import BlobHealth

log = logging.getLogger(__name__)
STOP_GRACE = 30.0  # seconds a message under way may take to be answered when the relay stops
TRACE_HEADER = "X-Sealrelay"


class MilterSession:
    """One SMTP session as the MTA reports it (gateway/fronts/milter_protocol.py `Filter`)."""

    def __init__(self, front: MilterFront) -> None:
        self.front = front
        self.macros: dict[str, str] = {}
        self.client = mp.Connect("", "U", 0, "")
        self.helo_name = ""
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.smtputf8 = False  # the client's MAIL asked for SMTPUTF8 (RFC 6531)
        self.recipients: list[str] = []
        self.submitter: users.Agent | trusted.TrustedSubmitter | None = None
        self.domains: frozenset[str] = frozenset()
        self.parts: list[bytes] = []
        self.header_counts: dict[str, int] = {}
        self.control_fields: list[tuple[str, int]] = []
        self.size = 0

    def abort(self) -> None:
        self._reset()

    async def connect(self, info: mp.Connect) -> mp.Reply:
        self.client = info
        return mp.CONTINUE

    async def helo(self, name: str) -> mp.Reply:
        self.helo_name = name
        return mp.CONTINUE

    @property
    def peer(self) -> str:
        return self.client.address or self.client.hostname

    async def mail(self, args: list[str]) -> mp.Reply:
        self._reset()
        address = (args[0] if args else "").strip().removeprefix("<").removesuffix(">")
        front = self.front
        if front.store is not None and not front.store.available:
            return mp.reply_code(Reply.STORE_UNAVAILABLE)  # before the MTA takes the data
        login = self.macros.get("auth_authen") or None
        try:
            agent = await users.agent_by_address(front.db, login) if login else None
            if agent is not None:
                if not may_use_sender(agent, address):
                    return mp.reply_code(Reply.not_your_address(address))
                self.submitter = agent
            else:
                self.domains = await front.served.allowed(front.match, address)
                if not trusted.sends_for(self.domains, address):
                    log.info("milter %s: refused sender %s", self.peer, address)
                    return mp.reply_code(Reply.not_our_domain(address, "MAIL FROM"))
        except Exception:
            log.exception("milter %s: cannot check the sender %s", self.peer, address)
            return mp.reply_code(Reply.TEMPORARY)
        self.mail_from = address
        self.smtputf8 = any(arg.upper() == "SMTPUTF8" for arg in args[1:])
        return mp.CONTINUE

    async def rcpt(self, args: list[str]) -> mp.Reply:
        limit = self.front.settings.smtp.max_recipients
        if len(self.recipients) >= limit:
            return mp.reply_code(Reply.TOO_MANY_RECIPIENTS.format(limit=limit))
        address = (args[0] if args else "").strip().removeprefix("<").removesuffix(">")
        self.recipients.append(address)
        return mp.CONTINUE

    async def header(self, name: str, value: bytes) -> mp.Reply:
        count = self.header_counts.get(name.lower(), 0) + 1
        self.header_counts[name.lower()] = count
        if name.lower() in STRIPPED_FIELDS:
            self.control_fields.append((name, count))
        folded = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return self._add(name.encode("ascii", errors="replace") + b":" + folded + b"\r\n")

    async def end_of_headers(self) -> mp.Reply:
        return self._add(b"\r\n")

    async def body(self, chunk: bytes) -> mp.Reply:
        return self._add(chunk)

    def _add(self, data: bytes) -> mp.Reply:
        """Keep the message's bytes while it stays under the size limit; past it, refuse."""
        limit = self.front.settings.smtp.max_message_size
        self.size += len(data)
        if self.size > limit:
            self.parts = []
            return mp.reply_code(Reply.TOO_BIG.format(limit=limit))
        self.parts.append(data)
        return mp.CONTINUE

    async def end_of_message(self) -> list[mp.Reply]:
        try:
            if self.mail_from is None or not self.recipients:
                raise RuntimeError("end of message without a sender and recipients")
            return await self._decide(self.mail_from, b"".join(self.parts))
        except Rejected as refusal:
            log.info("milter %s: refused mail from %s: %s", self.peer, self.mail_from, refusal)
            return [mp.reply_code(refusal.reply)]
        except StoreUnavailable as exc:
            log.warning(
                "milter %s: deferred mail from %s, blob store unavailable: %s",
                self.peer,
                self.mail_from,
                exc,
            )
            return [mp.reply_code(Reply.STORE_UNAVAILABLE)]  # BlobHealth knows (watched)
        except Exception:
            log.exception("milter %s: could not take mail from %s", self.peer, self.mail_from)
            return [mp.reply_code(Reply.TEMPORARY)]
        finally:
            self._reset()

    async def _decide(self, mail_from: str, raw: bytes) -> list[mp.Reply]:
        front = self.front
        envelope = Envelope(mail_from, tuple(self.recipients))
        login = self.macros.get("auth_authen") or None
        submitter = self.submitter or await trusted.submitter_of_message(
            front.match, self.domains, front.db, mail_from, raw
        )
        origin = Origin(
            helo=self.helo_name or self.client.hostname,
            peer=self.peer,
            protocol=("UTF8SMTP" if self.smtputf8 else "ESMTP") + ("A" if login else ""),
            trusted=(
                None
                if isinstance(submitter, users.Agent)
                else TrustedOrigin(front.match.entry.name, front.match.entry.settings.service_name)
            ),
        )
        prepared = await front.pipeline.prepare(envelope, raw, submitter, origin)
        record: MessageMilter = {
            "outcome": "passed" if prepared.unchanged else "taken_over",
            "mta_queue_id": (self.macros.get("i") or None),
            "login": login[:200] if login else None,
        }
        event = MESSAGE_MILTER.new(record, message_id=prepared.draft.message.id)
        if prepared.unchanged:
            message_id = await front.pipeline.pass_on(prepared, [event])
            log.info("milter: %s from %s passed to the MTA", message_id, mail_from)
            removals = [mp.delete_header(name, index) for name, index in self.control_fields]
            trace = f"{message_id} checked by {front.settings.server.hostname}; passed"
            return [*removals, mp.add_header(TRACE_HEADER, trace), mp.CONTINUE]
        prepared.draft.events.append(event)
        copies = await front.pipeline.materialize(prepared.draft, prepared.decisions)
        message_id = await front.pipeline.commit(prepared.draft, envelope, copies)
        log.info("milter: %s from %s taken over; the MTA discards its copy", message_id, mail_from)
        return [mp.DISCARD]


class MilterFront:
    """The `[milter] listen` socket; only the `allow_from` networks may speak to it.

    `store`: while it says the blob store is unavailable, MAIL FROM hears 451, as on the SMTP
    front, so the MTA keeps the message in its queue without sending us its data first."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        pipeline: Pipeline,
        store: BlobHealth | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.store = store
        milter = settings.milter
        entry = TrustedClient(
            name="milter",
            networks=milter.allow_from,
            service=milter.service,
            domains=milter.domains,
            map_agents=milter.map_agents,
        )
        self.match = TrustedMatch(TrustedEntry.load(entry), None)
        self.served = trusted.ServedDomains(settings, db)
        self.networks = self.match.entry.networks
        self.server: asyncio.Server | None = None
        self.connections: dict[asyncio.Task[None], mp.MilterConnection] = {}

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self, *, reuse_port: bool = False) -> None:
        """Listen when `[milter] listen` is set; `reuse_port` as for the SMTP front."""
        listen = self.settings.milter.listen
        if listen is None:
            return
        host, port = split_address(listen)
        self.server = await asyncio.start_server(self._connected, host, port, reuse_port=reuse_port)
        log.info("milter front listening on %s", listen)

    def _allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self._allowed(address):
            log.warning("milter: refused a connection from %s: not in milter.allow_from", address)
            writer.close()
            return
        connection = mp.MilterConnection(
            reader, writer, lambda: MilterSession(self), self.settings.milter.timeout
        )
        # its own task, so that `stop` can cancel it without asyncio's stream callback
        # logging the cancellation as an error
        task = asyncio.create_task(connection.run())
        self.connections[task] = connection
        try:
            await asyncio.wait([task])
        finally:
            self.connections.pop(task, None)

    async def stop(self) -> None:
        """Take no more connections; a message being decided gets STOP_GRACE seconds, then
        the rest are cut (the MTA then applies milter_default_action: tempfail)."""
        if self.server is None:
            return
        self.server.close()
        for task, connection in list(self.connections.items()):
            if not connection.busy:  # waiting for the MTA's next packet: nothing to lose
                task.cancel()
        tasks = set(self.connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None
