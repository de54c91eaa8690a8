"""Personal links: 256-bit random tokens, sent once, stored only as their sha256."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import (
    Delivery,
    DeliveryStatus,
    Link,
    LinkFile,
    LinkKind,
    Message,
    StoredFile,
    new_id,
)
from gateway.store.raw_sql import RawStatement, loaded

TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()


def download_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/d/{token}"


def letter_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/l/{token}"


def new_link(
    *,
    token: str,
    kind: LinkKind,
    message_id: str,
    recipient: str,
    language: str,
    now: datetime,
    days: int,
    files: Sequence[StoredFile] = (),
) -> tuple[Link, list[LinkFile]]:
    """The rows for one link; the caller adds them in its transaction."""
    link = Link(
        id=new_id(),
        token_hash=hash_token(token),
        kind=kind,
        message_id=message_id,
        recipient=recipient,
        language=language,
        created_at=now,
        expires_at=now + timedelta(days=days),
        expired=False,
    )
    entries = [
        LinkFile(link_id=link.id, file_id=f.id, position=i, downloads=0)
        for i, f in enumerate(files)
    ]
    return link, entries


class LinkState(StrEnum):
    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"  # an agent ended it: its page says access ended, never "expired"


class Closed(StrEnum):
    """Why a known token no longer opens its page: it ran out, or an agent ended it
    (`LinkDesk.revoke`), each with its own page."""

    EXPIRED = "expired"
    REVOKED = "revoked"


class TokenUnknown(Exception):
    """No link or letter has this token (or it is not a token at all)."""


class TokenClosed(Exception):
    """The token's link or letter exists but no longer opens; `reason` says why."""

    def __init__(self, reason: Closed) -> None:
        super().__init__(f"the token's page is {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Delivered:
    """When the link's copy reached its recipient's server, read with the link itself
    (`at` None: no copy yet), so a visit's judgement needs no second read."""

    at: datetime | None


@dataclass(frozen=True)
class FoundLink:
    link: Link
    message: Message
    files: list[StoredFile]
    state: LinkState
    delivered: Delivered | None = None


async def find_link(
    session: AsyncSession, token: str, now: datetime, kind: LinkKind = LinkKind.DOWNLOAD
) -> FoundLink | None:
    """The link for a token as a visitor presents it; None when no such link exists."""
    if not token or len(token) > 100:
        return None
    row = (
        await session.execute(
            select(Link, Message)
            .join(Message, Message.id == Link.message_id)
            .where(Link.token_hash == hash_token(token), Link.kind == kind)
        )
    ).first()
    if row is None:
        return None
    link, message = row
    return await found_of(session, link, message, now)


def read_link(
    connection: Connection, token: str, now: datetime, kind: LinkKind = LinkKind.DOWNLOAD
) -> FoundLink | None:
    """`find_link` as raw statements in the caller's read transaction (`Database.read`),
    with when the recipient's copy was delivered (`Delivered`) for a valid link: a visit's
    whole lookup in one call. The rows come back as plain objects, as a session loads them."""
    if not token or len(token) > 100:
        return None
    rows = _link_by_token().rows(connection, {"token_hash": hash_token(token), "kind": kind})
    if not rows:
        return None
    split = len(_LINK)
    link = _LINK.load(rows[0][:split])
    message = _MESSAGE.load(rows[0][split:])
    files = [_FILE.load(row) for row in _link_files().rows(connection, {"link_id": link.id})]
    state = link_state(link, now)
    delivered = Delivered(delivered_at(connection, link, now)) if state is LinkState.VALID else None
    return FoundLink(link, message, files, state, delivered)


def delivered_at(connection: Connection, link: Link, now: datetime) -> datetime | None:
    """When the newest copy of the link's message to its recipient was accepted upstream,
    between the link's creation and `now` (gateway/links/desk.py, `copy_delivered_at`)."""
    rows = _delivered().rows(
        connection,
        {
            "message_id": link.message_id,
            "recipient": link.recipient.lower(),
            "created_at": link.created_at,
            "now": now,
        },
    )
    found: datetime | None = rows[0][0] if rows else None
    return found


_LINK = loaded(Link)
_MESSAGE = loaded(Message)
_FILE = loaded(StoredFile)


# A visit's statements, each built once: building one cost more than running it.


@functools.cache
def _link_by_token() -> RawStatement:
    return RawStatement(
        select(*_LINK.columns, *_MESSAGE.columns)
        .select_from(Link.__table__)
        .join(Message.__table__, Message.id == Link.message_id)
        .where(Link.token_hash == bindparam("token_hash"), Link.kind == bindparam("kind"))
    )


@functools.cache
def _link_files() -> RawStatement:
    return RawStatement(
        select(*_FILE.columns)
        .select_from(StoredFile.__table__)
        .join(LinkFile.__table__, LinkFile.file_id == StoredFile.id)
        .where(LinkFile.link_id == bindparam("link_id"))
        .order_by(LinkFile.position)
    )


@functools.cache
def _delivered() -> RawStatement:
    return RawStatement(
        select(func.max(Delivery.updated_at)).where(
            Delivery.message_id == bindparam("message_id"),
            func.lower(Delivery.recipient) == bindparam("recipient"),
            Delivery.status == DeliveryStatus.DELIVERED,
            Delivery.updated_at >= bindparam("created_at"),
            Delivery.updated_at <= bindparam("now"),
        )
    )


async def find_recipient_link(
    session: AsyncSession, message: Message, recipient: str, now: datetime
) -> FoundLink | None:
    """The newest download link `message` made for `recipient`, reached without its token:
    a registered letter's offer page lists the files its held copy links to."""
    link = await session.scalar(
        select(Link)
        .where(
            Link.message_id == message.id,
            Link.recipient == recipient,
            Link.kind == LinkKind.DOWNLOAD,
        )
        .order_by(Link.created_at.desc(), Link.id)
        .limit(1)
    )
    return None if link is None else await found_of(session, link, message, now)


async def found_of(session: AsyncSession, link: Link, message: Message, now: datetime) -> FoundLink:
    files = (
        await session.scalars(
            select(StoredFile)
            .join(LinkFile, LinkFile.file_id == StoredFile.id)
            .where(LinkFile.link_id == link.id)
            .order_by(LinkFile.position)
        )
    ).all()
    return FoundLink(link, message, list(files), link_state(link, now))


def link_state(link: Link, now: datetime) -> LinkState:
    """Revoked before expired: an agent's ending says more than the date."""
    if link.revoked_at is not None:
        return LinkState.REVOKED
    if link.expired or link.expires_at <= now:
        return LinkState.EXPIRED
    return LinkState.VALID
