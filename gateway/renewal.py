"""A prospect whose letter link expired asks the agent for a new one.

The agent gets a short text mail from postmaster@{hostname}, queued like the consent
confirmation: its own Message (kind "confirmation", null sender, so it never bounces back
to us) and one Delivery, with a `letter.renewal_requested` journal event, in one
transaction. One request per letter per 24 hours is sent; later ones within that time are
answered the same way on the page but send nothing. The latest `letter.renewal_requested`
event of the letter decides, so the schema needs nothing new, and the letter's row is locked
first, so two requests at once cannot both send.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from email.charset import QP, Charset
from email.header import Header
from email.utils import format_datetime, make_msgid
from typing import Any

from sqlalchemy import select

from gateway import headers, journal
from gateway.events import DELIVERY_QUEUED, LETTER_RENEWAL_REQUESTED
from gateway.i18n import Catalog, shipped_catalogs
from gateway.local_mail import compose_queued, own_sender
from gateway.models import Event, Letter, Link, Message, MessageKind

INTERVAL = timedelta(hours=24)
SUBJECT_MAX = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def one_line(text: str, limit: int = SUBJECT_MAX) -> str:
    """A value fit for a header or a line of text: control characters and breaks gone."""
    return " ".join(_CONTROL.sub(" ", text).split())[:limit]


def _encoded(text: str) -> str:
    """RFC 2047 words for non-ASCII text, on one line (format_field folds it)."""
    return text if text.isascii() else " ".join(Header(text, "utf-8").encode().split())


def compose_request(
    catalog: Catalog,
    *,
    hostname: str,
    agent: str,
    recipient: str,
    subject: str,
    expired_on: datetime,
    now: datetime,
    sender: str | None = None,
) -> bytes:
    """The mail to the agent, as bytes; every header value is ours or reduced to one line."""
    recipient, subject = one_line(recipient), one_line(subject)
    mail_subject = catalog.t("renewal.subject", subject=subject, recipient=recipient)
    body = catalog.t(
        "renewal.body",
        recipient=recipient,
        subject=subject,
        date=catalog.moment(expired_on),
        hostname=hostname,
    )
    text = body.strip().replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"
    charset = Charset("utf-8")
    charset.body_encoding = QP
    encoded_body = charset.body_encode(text)
    top = [
        headers.format_field("From", f"<{sender or f'postmaster@{hostname}'}>"),
        headers.format_field("To", f"<{agent}>"),
        headers.format_field("Reply-To", f"<{recipient}>"),
        headers.format_field("Subject", _encoded(one_line(mail_subject, 998))),
        headers.format_field("Date", format_datetime(now)),
        headers.format_field("Message-ID", make_msgid(domain=hostname)),
        headers.format_field("Auto-Submitted", "auto-generated"),
        headers.format_field("X-Auto-Response-Suppress", "All"),
        headers.format_field("MIME-Version", "1.0"),
        headers.format_field("Content-Type", "text/plain; charset=utf-8"),
        headers.format_field("Content-Transfer-Encoding", "quoted-printable"),
    ]
    data = encoded_body.replace("\r\n", "\n").replace("\n", "\r\n")
    return b"".join(top) + b"\r\n" + data.encode("ascii")


async def request_new_link(
    relay: Any, letter: Letter, message: Message, ip: str, now: datetime
) -> bool:
    """Queue the request to the agent; False (and nothing written) when one went out < 24 h ago."""
    settings = relay.settings
    if not message.sender:
        return False
    catalog = shipped_catalogs(settings.branding.timezone)[settings.policy.language]
    hostname = settings.server.hostname
    async with relay.db.transaction() as session:
        locked = await session.scalar(
            select(Letter).where(Letter.id == letter.id).with_for_update()
        )
        if locked is None:
            return False
        earlier = await session.scalars(
            select(Event)
            .where(
                Event.type == LETTER_RENEWAL_REQUESTED.name, Event.message_id == letter.message_id
            )
            .order_by(Event.seq.desc())
        )
        if any(
            event.data.get("letter_id") == letter.id and event.at > now - INTERVAL
            for event in earlier
        ):
            return False
        link = await session.scalar(select(Link).where(Link.id == letter.link_id))
        raw = compose_request(
            catalog,
            hostname=hostname,
            agent=message.sender,
            recipient=letter.recipient,
            subject=letter.subject,
            expired_on=link.expires_at if link is not None else now,
            now=now,
            sender=own_sender(settings, message.sender),
        )
        notice, [delivery] = await compose_queued(
            relay.blobs,
            raw,
            kind=MessageKind.CONFIRMATION,
            user_id=message.user_id,
            recipients=[message.sender],
            now=now,
            lifetime=settings.upstream.queue_lifetime,
        )
        session.add(notice)
        await session.flush()
        session.add(delivery)
        await journal.append(
            session,
            [
                LETTER_RENEWAL_REQUESTED.new(
                    {
                        "letter_id": letter.id,
                        "recipient": letter.recipient,
                        "ip": ip,
                        "request_message_id": notice.id,
                    },
                    message_id=letter.message_id,
                    delivery_id=delivery.id,
                ),
                DELIVERY_QUEUED.new(
                    {"recipient": delivery.recipient},
                    message_id=notice.id,
                    delivery_id=delivery.id,
                ),
            ],
            now,
        )
    relay.signal.notify()
    return True
