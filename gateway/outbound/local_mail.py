"""The one door for mail the relay writes itself (bounces, confirmations, notices, requests).

``enqueue`` renders the mail (gateway.mail.own_mail) from an address of the agent's own domain
when that domain has a DKIM key, so delivery signs it like every outgoing copy, and queues it
in the caller's transaction: the stored message, one delivery per recipient and the journal
events saying so (``prepare`` does the same without a session, for a group commit). It leaves
from the null sender, so a failure never bounces back into a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.mail import headers, own_mail
from gateway.outbound.queue import new_delivery
from gateway.store.blobs import BlobStore
from gateway.store.events import BOUNCE_QUEUED, DELIVERY_QUEUED, NewEvent
from gateway.store.models import Base, Delivery, Message, MessageKind, new_id
from rules.domains import domain_of


@dataclass(frozen=True)
class Queued:
    """What ``enqueue`` added; ``events`` go into the caller's one ``journal.append``."""

    message: Message
    deliveries: list[Delivery]
    events: list[NewEvent]

    @property
    def rows(self) -> list[Base]:
        """What to insert, the message before the deliveries that refer to it."""
        return [self.message, *self.deliveries]


def own_sender(settings: Settings, agent: str, local_part: str | None = None) -> str:
    """The From address of mail the relay writes to `agent`.

    The agent's own domain when it has a DKIM key, so the mail is signed and aligned with the
    domain the agent's mailbox trusts; the relay's host name otherwise. `local_part` defaults
    to `[server] own_mail_sender`; bounces pass MAILER-DAEMON.
    """
    domain = domain_of(agent)
    signed = domain if domain in settings.dkim else settings.server.hostname
    return f"{local_part or settings.server.own_mail_sender}@{signed}"


async def prepare(
    blobs: BlobStore,
    settings: Settings,
    mail: own_mail.OwnMail,
    *,
    kind: MessageKind,
    user_id: int | None,
    now: datetime,
    copies: Sequence[str] = (),
    bounce_of: str | None = None,
) -> Queued:
    """``mail`` rendered and stored (its blob durable), with the rows and events that queue it
    to its addressee (and ``copies``, such as the archive); nothing written to the database.

    For callers that commit outside a session (the delivery worker's group commit): the
    awaits on the blob store happen before any transaction is open. Each delivery gets one
    event, ``delivery.queued`` (a bounce of the message ``bounce_of``: ``bounce.queued``).
    """
    sender = own_sender(settings, mail.to, mail.local_part)
    raw = own_mail.render(mail, sender=sender, hostname=settings.server.hostname, now=now)
    message = await _stored(blobs, raw, kind, user_id, now)
    lifetime = settings.upstream.queue_lifetime
    deliveries = [
        new_delivery(message.id, to, message.blob, now, lifetime) for to in (mail.to, *copies)
    ]
    return Queued(message, deliveries, [_queued(d, bounce_of) for d in deliveries])


async def enqueue(
    session: AsyncSession,
    blobs: BlobStore,
    settings: Settings,
    mail: own_mail.OwnMail,
    *,
    kind: MessageKind,
    user_id: int | None,
    now: datetime,
    copies: Sequence[str] = (),
    bounce_of: str | None = None,
) -> Queued:
    """Queue ``mail`` as `prepare` does, in ``session``; the caller appends the events with
    its own."""
    queued = await prepare(
        blobs,
        settings,
        mail,
        kind=kind,
        user_id=user_id,
        now=now,
        copies=copies,
        bounce_of=bounce_of,
    )
    session.add(queued.message)
    await session.flush()  # the deliveries refer to it
    session.add_all(queued.deliveries)
    return queued


def _queued(delivery: Delivery, bounce_of: str | None) -> NewEvent:
    names = {"message_id": delivery.message_id, "delivery_id": delivery.id}
    if bounce_of is not None:
        return BOUNCE_QUEUED.new({"original": bounce_of, "recipient": delivery.recipient}, **names)
    return DELIVERY_QUEUED.new({"recipient": delivery.recipient}, **names)


async def _stored(
    blobs: BlobStore, raw: bytes, kind: MessageKind, user_id: int | None, now: datetime
) -> Message:
    fields = headers.fields_of(raw)
    return Message(
        id=new_id(),
        kind=kind,
        received_at=now,
        sender="",
        user_id=user_id,
        blob=await blobs.put(raw),
        size=len(raw),
        message_id_header=headers.first_value(fields, "message-id") or "",
        subject=headers.decoded(headers.first_value(fields, "subject") or "")[:998],
        protocol="local",
    )
