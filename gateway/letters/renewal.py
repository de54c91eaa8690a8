"""A prospect whose letter link expired asks the agent for a new one.

The agent gets a short text mail, queued through the relay's one door for its own mail
(gateway/outbound/local_mail.py) like the consent confirmation: its own Message (kind
"confirmation", null sender, so it never bounces back to us) and one Delivery, with a
`letter.renewal_requested` journal event, in one transaction. One request per letter per
24 hours is sent; later ones within that time are answered the same way on the page but send
nothing. The latest `letter.renewal_requested` event of the letter decides, so the schema
needs nothing new, and the letter's row is locked first, so two requests at once cannot both
send.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.mail.own_mail import OwnMail, console_url, one_line, text_part
from gateway.outbound.local_mail import enqueue
from gateway.store import journal
from gateway.store.blobs import BlobStore
from gateway.store.events import LETTER_RENEWAL_REQUESTED
from gateway.store.models import Event, Letter, Link, Message, MessageKind
from gateway.texts.catalog import Catalog, shipped_catalogs

INTERVAL = timedelta(hours=24)
SUBJECT_MAX = 300


def request_mail(
    catalog: Catalog,
    *,
    console: str,
    agent: str,
    recipient: str,
    subject: str,
    expired_on: datetime,
) -> OwnMail:
    """The mail to the agent, answered to the prospect; every value reduced to one line.
    `console` is the message's console page, where the agent sends the letter again with a
    fresh link and the same texts in one step."""
    recipient, subject = one_line(recipient, SUBJECT_MAX), one_line(subject, SUBJECT_MAX)
    body = catalog.t(
        "renewal.body",
        recipient=recipient,
        subject=subject,
        date=catalog.moment(expired_on),
        console_url=console,
    )
    return OwnMail(
        to=agent,
        subject=one_line(catalog.t("renewal.subject", subject=subject, recipient=recipient), 998),
        body=text_part(body.strip() + "\n"),
        fields=(("Reply-To", f"<{recipient}>"),),
    )


async def queue_request(
    session: AsyncSession,
    blobs: BlobStore,
    settings: Settings,
    letter: Letter,
    message: Message,
    ip: str,
    now: datetime,
) -> bool:
    """Queue the request to the agent in `session`; False (and nothing written) when one went
    out < 24 h ago. The letter desk opens the transaction and wakes the queue."""
    if not message.sender:
        return False
    catalog = shipped_catalogs(settings.branding.timezone)[settings.policy.language]
    locked = await session.scalar(select(Letter).where(Letter.id == letter.id).with_for_update())
    if locked is None:
        return False
    earlier = await session.scalars(
        select(Event)
        .where(Event.type == LETTER_RENEWAL_REQUESTED.name, Event.message_id == letter.message_id)
        .order_by(Event.id.desc())
    )
    if any(
        event.data.get("letter_id") == letter.id and event.at > now - INTERVAL for event in earlier
    ):
        return False
    link = await session.scalar(select(Link).where(Link.id == letter.link_id))
    mail = request_mail(
        catalog,
        console=console_url(settings.server.public_url, letter.message_id),
        agent=message.sender,
        recipient=letter.recipient,
        subject=letter.subject,
        expired_on=link.expires_at if link is not None else now,
    )
    queued = await enqueue(
        session,
        blobs,
        settings,
        mail,
        kind=MessageKind.CONFIRMATION,
        user_id=message.user_id,
        now=now,
    )
    [delivery] = queued.deliveries
    requested = LETTER_RENEWAL_REQUESTED.new(
        {
            "letter_id": letter.id,
            "recipient": letter.recipient,
            "ip": ip,
            "request_message_id": queued.message.id,
        },
        message_id=letter.message_id,
        delivery_id=delivery.id,
    )
    await journal.append(session, [requested, *queued.events], now)
    return True
