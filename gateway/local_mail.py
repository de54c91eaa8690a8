"""Mail the relay writes itself (bounces, confirmations, renewal requests), queued one way.

It leaves from the null sender, so a failure never bounces back into a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gateway import headers
from gateway.blobstore import BlobStore
from gateway.config import Settings
from gateway.models import Delivery, Message, MessageKind, new_id
from gateway.queue import new_delivery


def own_sender(settings: Settings, agent: str, local_part: str | None = None) -> str:
    """The From address of mail the relay writes to `agent`.

    The agent's own domain when it has a DKIM key, so the mail is signed and aligned with the
    domain the agent's mailbox trusts; the relay's host name otherwise. `local_part` defaults
    to `[server] own_mail_sender`; bounces pass MAILER-DAEMON.
    """
    domain = agent.rpartition("@")[2].lower()
    signed = domain if domain in settings.dkim else settings.server.hostname
    return f"{local_part or settings.server.own_mail_sender}@{signed}"


async def compose_queued(
    blobs: BlobStore,
    raw: bytes,
    *,
    kind: MessageKind,
    user_id: int | None,
    recipients: Sequence[str],
    now: datetime,
    lifetime: float,
) -> tuple[Message, list[Delivery]]:
    """The message row and its deliveries; the caller adds them in its transaction."""
    fields = headers.fields_of(raw)
    message = Message(
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
    deliveries = [new_delivery(message.id, r, message.blob, now, lifetime) for r in recipients]
    return message, deliveries
