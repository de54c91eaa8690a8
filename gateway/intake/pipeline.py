"""The heart of the relay: receive -> facts -> plan -> materialize -> commit.

`Pipeline.submit` is the one entry every front (SMTP submission today; smart-host, content
filter and milter later) feeds with an envelope, the raw bytes and who sent them. It returns
only once the message and every copy to deliver are durable; after that the front may answer
250. Delivery is the queue's job (gateway/outbound/delivery.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import make_msgid
from typing import Protocol

from gateway.config import Settings
from gateway.draft import Draft, keep
from gateway.intake.materializers import materializers
from gateway.mail import headers, mime, winmail
from gateway.mail.headers import HeaderField
from gateway.mail.loop_mark import LOOP_HEADER, Finding, LoopMarks
from gateway.outbound.queue import new_delivery
from gateway.outbound.queue_signal import QueueSignal
from gateway.outbound.stored_copy import intake_body_hash
from gateway.rejections import Rejected
from gateway.store import group_commit, journal
from gateway.store.blobs import BlobStore, HashedFile
from gateway.store.bulk import new_row
from gateway.store.db import Database
from gateway.store.events import (
    DELIVERY_QUEUED,
    LANGUAGE_UNSUPPORTED,
    MESSAGE_LOOP_MARK_FORGED,
    MESSAGE_RECEIVED,
    MESSAGE_TRUSTED_CLIENT,
    WINMAIL_UNPACKED,
    LanguageUnsupported,
    MessageLoopMarkForged,
    MessageTrustedClient,
    WinmailUnpacked,
)
from gateway.store.models import Delivery, Message, new_id, utcnow
from rules.actions import KeepOriginal
from rules.facts import MessageFacts
from rules.language import LANGUAGE_HEADER_NAME, unsupported_request
from rules.plan import Decision, plan

log = logging.getLogger(__name__)

# The agent's instructions to the relay; they never leave it.
CONTROL_FIELDS = ("x-sealrelay-language", "x-sealrelay-action")
# Marks that came in (not loops: forged or expired) never leave; each copy gets our own. A Bcc
# field some clients leave in the message would show every recipient who else got it (RFC
# 5322 3.6.3): it goes too (and Resent-Bcc), as Postfix's cleanup removes them; so does a
# Return-Path, which only the final delivery writes (RFC 5321 4.4: not sent on).
STRIPPED_FIELDS = (*CONTROL_FIELDS, LOOP_HEADER.lower(), "bcc", "resent-bcc", "return-path")


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class TrustedOrigin:
    """The trusted-client entry that let a message in without AUTH, for the journal."""

    entry: str
    service: str
    certificate: str | None = None

    def describe(self) -> str:
        """For the Received line: `SERVICE, entry NAME, certificate CN`."""
        certificate = f", certificate {self.certificate}" if self.certificate else ""
        return f"{self.service}, entry {self.entry}{certificate}"[:300]


@dataclass(frozen=True)
class Origin:
    """Where the message came in, for the Received line and the journal."""

    helo: str
    peer: str
    protocol: str
    trusted: TrustedOrigin | None = None


@dataclass(frozen=True)
class Received:
    """What a front learned of the bytes as it read them, so that the pipeline does not
    pass over a big message again: `file`, the bytes as a spool file the blob store may
    keep as the original; `bare_line_end`, whether a bare CR or LF was among them (None:
    not looked for, the pipeline looks)."""

    file: HashedFile | None = None
    bare_line_end: bool | None = None


@dataclass(frozen=True)
class Prepared:
    """A message the pipeline has checked and planned, not yet committed."""

    envelope: Envelope
    draft: Draft
    decisions: Mapping[str, Decision]

    @property
    def unchanged(self) -> bool:
        """Every recipient gets the original as it came (no links, no letter)."""
        return all(isinstance(d.action, KeepOriginal) for d in self.decisions.values())


class Submitter(Protocol):
    """Who hands the message in: an authenticated agent, or a trusted client's service."""

    @property
    def user_id(self) -> int | None: ...
    @property
    def group(self) -> str | None: ...
    def may_send_as(self, address: str) -> bool: ...


def may_use_sender(submitter: Submitter, mail_from: str) -> bool:
    """MAIL FROM's address: one the submitter may send as, or the null sender "" of an
    auto-reply, a delivery report or a read receipt, which is anyone's: its From header,
    checked as every other message's, says whose mail it is."""
    return not mail_from or submitter.may_send_as(mail_from)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        signal: QueueSignal | None = None,
        clock: Callable[[], datetime] = utcnow,
        loop: LoopMarks | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.loop = loop
        self.db = db
        self.blobs = blobs
        self.signal = signal or QueueSignal()
        self.policy = settings.policy_config()
        self.materializers = materializers(settings, blobs)
        self.signing_domains = frozenset(settings.dkim)  # domain keys (Settings)

    async def submit(
        self,
        envelope: Envelope,
        raw: bytes,
        submitter: Submitter,
        origin: Origin,
        received: Received | None = None,
    ) -> str:
        """The new message's id once it is durable; raises Rejected with the reply to give.
        `received`: what the front learned of `raw` as it read it."""
        prepared = await self.prepare(envelope, raw, submitter, origin, received)
        copies = await self.materialize(prepared.draft, prepared.decisions)
        return await self.commit(prepared.draft, envelope, copies)

    async def prepare(
        self,
        envelope: Envelope,
        raw: bytes,
        submitter: Submitter,
        origin: Origin,
        received: Received | None = None,
    ) -> Prepared:
        """Checked, the original stored, each recipient's decision made; nothing committed.

        The milter front looks at the decisions before choosing to commit copies or only a
        record (`pass_on`); every other front goes straight on, as `submit` does.
        """
        received = received or Received()
        fields = self.receive(envelope, raw, submitter, received.bare_line_end)
        ignored = self.refuse_loops(fields)
        fields = [field for field in fields if field.name != LOOP_HEADER.lower()]
        draft = await self.draft(envelope, raw, fields, submitter, origin, received.file)
        draft.events.extend(trusted_origin(origin, draft.message.id))
        draft.events.extend(ignored_marks(ignored, draft.message.id))
        facts = message_facts(envelope, fields, submitter, draft)
        decisions = plan(facts, self.policy).per_recipient
        draft.events.extend(language_warnings(facts, decisions, draft.message.id))
        prepared = Prepared(envelope, draft, decisions)
        if draft.unpacked and not prepared.unchanged:
            files: WinmailUnpacked = {"files": draft.unpacked}
            draft.events.append(WINMAIL_UNPACKED.new(files, message_id=draft.message.id))
        return prepared

    async def pass_on(self, prepared: Prepared, events: list[journal.NewEvent]) -> str:
        """Journal a message another MTA delivers itself (every copy is the original): the
        message and its record are committed, and no delivery is queued."""
        await self.materialize(prepared.draft, prepared.decisions)  # their journal entries
        prepared.draft.events.extend(events)
        return await self.commit(prepared.draft, prepared.envelope, {})

    def receive(
        self,
        envelope: Envelope,
        raw: bytes,
        submitter: Submitter,
        bare_line_end: bool | None = None,
    ) -> list[HeaderField]:
        """Refuse what must not be relayed; the checks every front shares. `bare_line_end`:
        what the front found as it read `raw` (None: it did not look)."""
        if bare_line_end is None:
            bare_line_end = headers.has_bare_line_end(raw)
        if bare_line_end:
            raise Rejected(
                "550 5.6.0 The message contains a bare CR or LF; lines must end with CRLF"
            )
        fields = headers.fields_of(raw)
        hops = sum(1 for field in fields if field.name == "received")
        if hops >= self.settings.smtp.max_received_headers:
            raise Rejected(f"554 5.4.6 Too many Received headers ({hops}): a mail loop?")
        if not may_use_sender(submitter, envelope.mail_from):
            raise Rejected(f"553 5.7.1 You may not send as <{envelope.mail_from}>")
        authors = headers.addresses(fields, "from")
        if not authors:
            raise Rejected("550 5.6.0 The message has no From header")
        for author in authors:
            if not submitter.may_send_as(author):
                raise Rejected(f"553 5.7.1 You may not send as {author} (From header)")
        return fields

    def refuse_loops(self, fields: list[HeaderField]) -> list[Finding]:
        """Refuse a copy of ours that came back (554 5.4.6); the marks that are not ours, or
        too old to count, to note. Without a key (a bare pipeline in tests) nothing is judged.
        """
        findings = self.loop.judge(fields) if self.loop is not None else []
        for finding in findings:
            if finding.verdict == "loop":
                log.warning("refused a routing loop: %s (relay %s)", finding.reason, finding.relay)
                raise Rejected(
                    f"554 5.4.6 Routing loop detected: this message was already relayed by"
                    f" {finding.relay} and came back; check the mail flow rule that sends mail"
                    f" to this relay (it must skip messages with the {LOOP_HEADER} header)"
                )
        return findings

    async def draft(
        self,
        envelope: Envelope,
        raw: bytes,
        fields: list[HeaderField],
        submitter: Submitter,
        origin: Origin,
        received: HashedFile | None = None,
    ) -> Draft:
        """Store the original as received; prepare what every copy starts from.

        Copies lose the agent's instructions to us (X-Sealrelay-* fields), any Bcc field and
        a Return-Path; the original keeps them, as the record of what the agent sent.
        """
        base = headers.remove_fields(raw, STRIPPED_FIELDS)
        try:
            root = mime.parse(base)
        except mime.UnsafeMessage as exc:
            raise Rejected(f"554 5.6.0 {exc}") from exc
        now = self.clock()
        inline: dict[str, bytes] = {}
        original = await keep(self.blobs, raw, inline, received)
        message = new_row(
            Message,
            id=new_id(),
            received_at=now,
            sender=envelope.mail_from,
            user_id=submitter.user_id,
            blob=original,
            size=len(raw),
            message_id_header=headers.first_value(fields, "message-id")
            or make_msgid(domain=self.settings.server.hostname),
            subject=headers.decoded(headers.first_value(fields, "subject") or "")[:998],
            sender_name=headers.sender_name(fields, envelope.mail_from),
            helo=origin.helo[:255],
            peer=origin.peer[:100],
            protocol=origin.protocol,
            trusted_client=origin.trusted.describe() if origin.trusted else None,
            trusted_entry=origin.trusted.entry if origin.trusted else None,
        )
        copy_base = original if base == raw else await keep(self.blobs, base, inline)
        unpacked = winmail.unpacked(base, root, message.id)
        if unpacked is None:
            return Draft(message, now, base, root, copy_base, base, inline_blobs=inline)
        return Draft(
            message,
            now,
            unpacked.raw,
            unpacked.root,
            copy_base,
            base,
            inline_blobs=inline,
            unpacked=list(unpacked.files),
        )

    async def materialize(
        self, draft: Draft, per_recipient: Mapping[str, Decision]
    ) -> dict[str, str]:
        """Each recipient's copy as the digest of a durable blob."""
        copies = {}
        for recipient, decision in per_recipient.items():
            materializer = self.materializers[type(decision.action)]
            copies[recipient] = await materializer(draft, recipient, decision.action)
        return copies

    async def commit(self, draft: Draft, envelope: Envelope, copies: Mapping[str, str]) -> str:
        """Message, copies, links and journal committed together: after this, 250 is safe.

        The rows join the group commit (gateway/store/group_commit.py): this session waits
        for the transaction that carries its message, shared with other sessions' messages.
        """
        message, now = draft.message, draft.now
        if message.blob in copies.values():  # the original itself leaves: read once (stored_copy)
            message.body_hash = intake_body_hash(draft.base, self.signing_domains)
        lifetime = self.settings.upstream.queue_lifetime
        deliveries = [
            new_delivery(message.id, recipient, blob, now, lifetime)
            for recipient, blob in copies.items()
        ]
        events = intake_events(message, envelope.recipients, deliveries, draft.events)
        await group_commit.insert(
            self.db, [message, *draft.rows, *deliveries], events, now, draft.inline_blobs
        )
        self.blobs.committed_inline(draft.inline_blobs)
        self.signal.notify()
        log.info(  # as the outcome lines, in Postfix's words: grep finds a message by its id
            "%s: from=<%s>, size=%d, nrcpt=%d (accepted)",
            message.id,
            message.sender,
            message.size,
            len(deliveries),
        )
        return message.id


def intake_events(
    message: Message,
    recipients: Sequence[str],
    deliveries: Sequence[Delivery],
    between: Sequence[journal.NewEvent] = (),
) -> list[journal.NewEvent]:
    """What the journal says of a message taken: received, then `between` (the plan's),
    then each copy queued."""
    return [
        MESSAGE_RECEIVED.new(
            {
                "sender": message.sender,
                "recipients": list(recipients),
                "size": message.size,
                "subject": message.subject,
                "message_id": message.message_id_header,
                "user_id": message.user_id,
                "peer": message.peer,
            },
            message_id=message.id,
        ),
        *between,
        *(
            DELIVERY_QUEUED.new({"recipient": d.recipient}, message_id=message.id, delivery_id=d.id)
            for d in deliveries
        ),
    ]


def message_facts(
    envelope: Envelope, fields: list[HeaderField], submitter: Submitter, draft: Draft
) -> MessageFacts:
    return MessageFacts(
        sender=envelope.mail_from,
        group=submitter.group,
        recipients=envelope.recipients,
        subject=headers.decoded(headers.first_value(fields, "subject") or ""),
        headers=tuple((field.name, field.value) for field in fields),
        parts=mime.part_facts(draft.raw, draft.root),
        signed=mime.is_signed(draft.root),
        winmail=bool(draft.unpacked),
    )


def trusted_origin(origin: Origin, message_id: str) -> list[journal.NewEvent]:
    """Which trusted entry let the message in, when no agent logged in."""
    if origin.trusted is None:
        return []
    data: MessageTrustedClient = {
        "entry": origin.trusted.entry,
        "service": origin.trusted.service,
        "peer": origin.peer[:100],
        "certificate": origin.trusted.certificate,
        "protocol": origin.protocol,
    }
    return [MESSAGE_TRUSTED_CLIENT.new(data, message_id=message_id)]


def ignored_marks(findings: list[Finding], message_id: str) -> list[journal.NewEvent]:
    """A journal event per forged mark; expired marks of ours are only logged."""
    events = []
    for finding in findings:
        if finding.verdict == "forged":
            log.warning(
                "message %s: a forged %s mark (claims %r): %s; removed from the copies",
                message_id,
                LOOP_HEADER,
                finding.relay,
                finding.reason,
            )
            data: MessageLoopMarkForged = {"relay": finding.relay, "reason": finding.reason}
            events.append(MESSAGE_LOOP_MARK_FORGED.new(data, message_id=message_id))
        else:
            log.info(
                "message %s: our own %s mark, %s: not a loop; removed from the copies",
                message_id,
                LOOP_HEADER,
                finding.reason,
            )
    return events


def language_warnings(
    facts: MessageFacts,
    decisions: Mapping[str, Decision],
    message_id: str,
) -> list[journal.NewEvent]:
    """A `language.unsupported` warning when the agent asked for a language we do not ship,
    naming the language each recipient got instead; the agent's console and CRM see it."""
    requested = unsupported_request(facts)
    if requested is None:
        return []
    used = {
        recipient: language
        for recipient, decision in decisions.items()
        if (language := getattr(decision.action, "language", None)) is not None
    }
    log.warning(
        "message %s: %s %r is not a language we ship; using %s",
        message_id,
        LANGUAGE_HEADER_NAME,
        requested,
        ", ".join(sorted(set(used.values()))) or "none (no text in a language was needed)",
    )
    data: LanguageUnsupported = {
        "header": LANGUAGE_HEADER_NAME,
        "requested": requested[:100],
        "used": used,
    }
    return [LANGUAGE_UNSUPPORTED.new(data, message_id=message_id)]
