"""Messages written straight into the tables the desks keep, with their journal events, for
read-model tests that need many messages or a state that takes days to reach by mail."""

from __future__ import annotations

from datetime import datetime, timedelta

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import (
    CONSENT_GIVEN,
    DELIVERY_BOUNCED,
    DELIVERY_DELIVERED,
    DELIVERY_QUEUED,
    LETTER_HELD,
    MESSAGE_RECEIVED,
    NewEvent,
)
from gateway.store.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    new_id,
)
from gateway.store.sequencer import chain_all


async def seed_message(
    db: Database,
    *,
    user_id: int | None,
    received_at: datetime,
    recipients: dict[str, str],
    subject: str = "Ihr Exposé",
    sender: str = "agent@broker.example",
) -> str:
    """One message; `recipients` maps each address to what happened to it: "queued",
    "delivered", "bounced", "deleted", "letter_held", "letter_expired", "consented"
    (released copy queued), "released" (released copy delivered), "link_expired",
    "letter_revoked" (held, its link revoked)."""
    message_id = new_id()
    rows: list[object] = [
        Message(
            id=message_id,
            received_at=received_at,
            sender=sender,
            user_id=user_id,
            blob="0" * 64,
            size=100,
            message_id_header=f"<{message_id}@test>",
            subject=subject,
        )
    ]
    events: list[NewEvent] = [
        MESSAGE_RECEIVED.new(
            {
                "sender": sender,
                "recipients": list(recipients),
                "size": 100,
                "subject": subject,
                "message_id": f"<{message_id}@test>",
                "user_id": user_id,
                "peer": "127.0.0.1",
            },
            message_id=message_id,
        )
    ]
    expires = received_at + timedelta(days=5)

    def copy(to: str, status: DeliveryStatus) -> Delivery:
        delivery = Delivery(
            id=new_id(),
            message_id=message_id,
            recipient=to,
            blob="1" * 64,
            status=status,
            next_attempt_at=received_at,
            expires_at=expires,
        )
        rows.append(delivery)
        events.append(
            DELIVERY_QUEUED.new({"recipient": to}, message_id=message_id, delivery_id=delivery.id)
        )
        if status == DeliveryStatus.DELIVERED:
            events.append(
                DELIVERY_DELIVERED.new(
                    {"recipient": to, "attempt": 1, "remote": None},
                    message_id=message_id,
                    delivery_id=delivery.id,
                )
            )
        if status == DeliveryStatus.BOUNCED:
            events.append(
                DELIVERY_BOUNCED.new(
                    {"recipient": to, "attempt": 1, "error": "550 no such user", "status": "5.1.1"},
                    message_id=message_id,
                    delivery_id=delivery.id,
                )
            )
        return delivery

    for to, what in recipients.items():
        if what in ("queued", "delivered", "bounced", "deleted"):
            copy(to, DeliveryStatus(what))
            continue
        if what == "link_expired":
            copy(to, DeliveryStatus.DELIVERED)
            rows.append(
                Link(
                    id=new_id(),
                    token_hash=new_id() + "x" * 44,
                    kind=LinkKind.DOWNLOAD,
                    message_id=message_id,
                    recipient=to,
                    language="de",
                    expires_at=received_at,
                    expired=True,
                )
            )
            continue
        copy(to, DeliveryStatus.DELIVERED)  # the letter itself
        link = Link(
            id=new_id(),
            token_hash=new_id() + "y" * 44,
            kind=LinkKind.LETTER,
            message_id=message_id,
            recipient=to,
            language="de",
            expires_at=received_at + timedelta(days=14),
            revoked_at=received_at if what == "letter_revoked" else None,
        )
        status = {
            "letter_held": LetterStatus.HELD,
            "letter_revoked": LetterStatus.HELD,
            "letter_expired": LetterStatus.EXPIRED,
        }.get(what, LetterStatus.RELEASED)
        letter = Letter(
            id=new_id(),
            message_id=message_id,
            recipient=to,
            link_id=link.id,
            letter_blob="2" * 64,
            status=status,
            language="de",
            subject=subject,
            blocks=[],
            button="OK",
            texts_sha256="3" * 64,
            held_blob="4" * 64,
        )
        rows += [link, letter]
        events.append(
            LETTER_HELD.new(
                {
                    "recipient": to,
                    "letter_id": letter.id,
                    "expires_at": link.expires_at.isoformat(),
                    "texts_sha256": "3" * 64,
                },
                message_id=message_id,
            )
        )
        if status == LetterStatus.RELEASED:
            released = copy(
                to, DeliveryStatus.DELIVERED if what == "released" else DeliveryStatus.QUEUED
            )
            consent = Consent(
                id=new_id(),
                letter_id=letter.id,
                given_at=received_at,
                ip="192.0.2.1",
                user_agent="test",
                blocks=[],
                checked=[],
                texts_sha256="3" * 64,
                letter_sent_at=received_at,
                pdf_blob="5" * 64,
                released_delivery_id=released.id,
            )
            rows.append(consent)
            events.append(
                CONSENT_GIVEN.new(
                    {
                        "recipient": to,
                        "ip": "192.0.2.1",
                        "user_agent": "test",
                        "consent_id": consent.id,
                        "letter_id": letter.id,
                        "texts_sha256": "3" * 64,
                        "checked": [],
                    },
                    message_id=message_id,
                )
            )
    async with db.transaction() as session:
        for row in rows:
            session.add(row)
            await session.flush()
        await journal.append(session, events, received_at)
    await chain_all(db)  # as a running relay's sequencer does within a second
    return message_id
