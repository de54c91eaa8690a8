"""The read model over the journal: an agent's messages, one message's story, the event feed.

Every query is narrowed by the caller's `MessageScope` (gateway/access.py): a message outside
it is "not found", and the feed holds only events of messages inside it (a scoped caller
sees no event that names no message).

The state of a recipient is derived from the rows the desks keep, not stored, so it can
never disagree with them. In this order, the first that holds:

- `bounced`: a copy to the recipient (the mail, the letter, or the released offer) bounced.
- `revoked`: the link of the recipient's held registered letter was revoked (it never
  expires after that: revoked is what it stays until the letter is sent again).
- `expired`: the recipient's registered letter expired without consent, or a download link
  of theirs expired or was revoked (the files are no longer reachable).
- `released`: they consented and the released offer was delivered upstream.
- `consented`: they consented; the released offer is still queued.
- `letter_waiting`: their registered letter waits for consent.
- `queued`: a copy is still waiting for delivery.
- `delivered`: every copy was accepted upstream.
- `deleted`: an admin gave up the copies without a bounce.

A message's own `state` is its recipients' states, and the state filter finds messages with
at least one recipient in the state asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.access import MessageScope
from gateway.store.db import Database
from gateway.store.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Event,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    MessageKind,
    User,
)


class RecipientState(StrEnum):
    BOUNCED = "bounced"
    REVOKED = "revoked"
    EXPIRED = "expired"
    RELEASED = "released"
    CONSENTED = "consented"
    LETTER_WAITING = "letter_waiting"
    QUEUED = "queued"
    DELIVERED = "delivered"
    DELETED = "deleted"


class BadCursor(ValueError):
    """A cursor this desk did not hand out (or one of another listing)."""


@dataclass(frozen=True)
class MessageFilter:
    text: str | None = None  # in a recipient's address or the subject, any case
    state: RecipientState | None = None
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before


@dataclass(frozen=True)
class RecipientRow:
    address: str
    state: RecipientState


@dataclass(frozen=True)
class MessageRow:
    id: str
    received_at: datetime
    sender: str
    subject: str
    recipients: list[RecipientRow]


@dataclass(frozen=True)
class Page:
    items: list[MessageRow]
    next_cursor: str | None


@dataclass(frozen=True)
class EventRow:
    seq: int | None  # None in a message's story while the sequencer has not chained it
    at: datetime
    type: str
    message_id: str | None
    delivery_id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class LinkRef:
    """A link made for a recipient, by the id that the agents' actions take."""

    id: str
    kind: str
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class LetterRef:
    """A registered letter to a recipient, by the id that the letter actions take."""

    id: str
    status: str


class Target(StrEnum):
    """What an agent's action names: a message, or a letter or link of one."""

    MESSAGE = "message"
    LETTER = "letter"
    LINK = "link"


@dataclass(frozen=True)
class RecipientStory:
    address: str
    state: RecipientState
    events: list[EventRow]
    links: list[LinkRef] = field(default_factory=list)
    letters: list[LetterRef] = field(default_factory=list)


@dataclass(frozen=True)
class MessageStory:
    message: MessageRow
    recipients: list[RecipientStory]
    # events that name no single recipient (message.received, language.unsupported)
    events: list[EventRow] = field(default_factory=list)


CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f]{1,32}$"
_CURSOR = re.compile(CURSOR_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(received_at: datetime, message_id: str) -> str:
    """A position between messages: the last one's time (microseconds) and id.

    Every string of this shape is a position, so a cursor is either malformed or usable.
    """
    micros = (received_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}.{message_id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    if not _CURSOR.match(cursor):
        raise BadCursor("the cursor is not one this listing handed out")
    micros, _, message_id = cursor.partition(".")
    return _EPOCH + timedelta(microseconds=int(micros)), message_id


def scope_clause(scope: MessageScope) -> ColumnElement[bool] | None:
    """The one narrowing of a `Message` query by a caller's scope (None: no narrowing), for
    every console read; gateway/access.py `MessageScope.covers` says the same in Python."""
    if scope.everything:
        return None
    if scope.group is not None:
        return Message.user_id.in_(select(User.id).where(User.group_name == scope.group))
    return Message.user_id == scope.user_id


def _recipient_facts() -> Any:
    """Flags per (message_id, recipient) from three sources: copies, letters (with their
    consent's released copy) and download links. `_state_of` folds them per recipient in the
    order the module doc lists."""
    released = (
        select(Delivery.status).where(Delivery.id == Consent.released_delivery_id).scalar_subquery()
    )
    copies = select(
        Delivery.message_id.label("message_id"),
        Delivery.recipient.label("recipient"),
        case((Delivery.status == DeliveryStatus.BOUNCED, 1), else_=0).label("bounced"),
        literal(0).label("revoked"),
        literal(0).label("expired"),
        literal(0).label("released"),
        literal(0).label("consented"),
        literal(0).label("waiting"),
        case((Delivery.status == DeliveryStatus.QUEUED, 1), else_=0).label("queued"),
        case((Delivery.status == DeliveryStatus.DELIVERED, 1), else_=0).label("delivered"),
    )
    held = Letter.status == LetterStatus.HELD
    letters = (
        select(
            Letter.message_id,
            Letter.recipient,
            literal(0),
            case((and_(held, Link.revoked_at.is_not(None)), 1), else_=0),
            case((Letter.status == LetterStatus.EXPIRED, 1), else_=0),
            case(
                (
                    and_(
                        Letter.status == LetterStatus.RELEASED,
                        released == DeliveryStatus.DELIVERED,
                    ),
                    1,
                ),
                else_=0,
            ),
            case((Letter.status == LetterStatus.RELEASED, 1), else_=0),
            case((held, 1), else_=0),
            literal(0),
            literal(0),
        )
        .join(Link, Link.id == Letter.link_id)
        .outerjoin(Consent, Consent.letter_id == Letter.id)
    )
    links = select(
        Link.message_id,
        Link.recipient,
        literal(0),
        literal(0),
        case((or_(Link.expired, Link.revoked_at.is_not(None)), 1), else_=0),
        literal(0),
        literal(0),
        literal(0),
        literal(0),
        literal(0),
    ).where(Link.kind == LinkKind.DOWNLOAD)
    return union_all(copies, letters, links).subquery("facts")


def _state_of(facts: Any) -> ColumnElement[str]:
    flag = facts.c
    return case(
        (func.max(flag.bounced) == 1, RecipientState.BOUNCED.value),
        (func.max(flag.revoked) == 1, RecipientState.REVOKED.value),
        (func.max(flag.expired) == 1, RecipientState.EXPIRED.value),
        (func.max(flag.released) == 1, RecipientState.RELEASED.value),
        (func.max(flag.consented) == 1, RecipientState.CONSENTED.value),
        (func.max(flag.waiting) == 1, RecipientState.LETTER_WAITING.value),
        (func.max(flag.queued) == 1, RecipientState.QUEUED.value),
        (func.max(flag.delivered) == 1, RecipientState.DELIVERED.value),
        else_=RecipientState.DELETED.value,
    )


def _states_for(message_ids: Sequence[str] | None) -> Select[Any]:
    facts = _recipient_facts()
    query = select(facts.c.message_id, facts.c.recipient, _state_of(facts).label("state"))
    if message_ids is not None:
        query = query.where(facts.c.message_id.in_(message_ids))
    return query.group_by(facts.c.message_id, facts.c.recipient)


def _could_be(state: RecipientState) -> Any:
    """The ids of messages with a row that can make a recipient's state `state` under
    `_state_of`: a superset of the messages in that state (the fold decides which are),
    read through the status indexes, so a filter for a rare state skips the other messages
    without folding them. None: every message is a candidate (`delivered`, which most
    messages are: walking them newest first finds a page sooner than reading all their ids)."""
    if state is RecipientState.BOUNCED:
        return select(Delivery.message_id).where(Delivery.status == DeliveryStatus.BOUNCED)
    if state is RecipientState.QUEUED:
        return select(Delivery.message_id).where(Delivery.status == DeliveryStatus.QUEUED)
    if state in (RecipientState.RELEASED, RecipientState.CONSENTED):
        return select(Letter.message_id).where(Letter.status == LetterStatus.RELEASED)
    if state in (RecipientState.LETTER_WAITING, RecipientState.REVOKED):
        return select(Letter.message_id).where(Letter.status == LetterStatus.HELD)
    if state is RecipientState.EXPIRED:
        return union_all(
            select(Letter.message_id).where(Letter.status == LetterStatus.EXPIRED),
            select(Link.message_id).where(
                Link.kind == LinkKind.DOWNLOAD, or_(Link.expired, Link.revoked_at.is_not(None))
            ),
        )
    if state is RecipientState.DELETED:  # a recipient none of whose rows sets a flag
        return union_all(
            select(Delivery.message_id).where(
                Delivery.status.not_in(
                    [DeliveryStatus.BOUNCED, DeliveryStatus.QUEUED, DeliveryStatus.DELIVERED]
                )
            ),
            select(Letter.message_id).where(
                Letter.status.not_in(
                    [LetterStatus.EXPIRED, LetterStatus.RELEASED, LetterStatus.HELD]
                )
            ),
            select(Link.message_id).where(
                Link.kind == LinkKind.DOWNLOAD, Link.expired.is_(False), Link.revoked_at.is_(None)
            ),
        )
    return None


def _listing(
    scope: MessageScope,
    filters: MessageFilter,
    position: tuple[datetime, str] | None,
    limit: int,
    *,
    by_index: bool,
) -> Select[Any]:
    """Up to `limit` messages after `position` (newest first) that pass the filters, the
    state's candidates (`_could_be`) standing in for the state itself.

    With `by_index` (PostgreSQL, whose trigram indexes serve `ILIKE '%...%'`), a text
    search is two queries, one per place the text can be (the subject, a recipient), each
    ordered and cut at `limit` on its own: each can then walk the newest messages when the
    text is common, or read a short list from its index when it is rare, which one query
    with an OR cannot. Without such indexes (SQLite) one query with an OR is faster: it
    stops at the first page of matches, where the split one scans the place that has few;
    its recipients' list is read once (uncorrelated), not probed once per message.
    """

    def narrowed(query: Select[Any]) -> Select[Any]:
        query = query.where(Message.kind == MessageKind.SUBMITTED)
        clause = scope_clause(scope)
        if clause is not None:
            query = query.where(clause)
        if filters.since is not None:
            query = query.where(Message.received_at >= filters.since)
        if filters.until is not None:
            query = query.where(Message.received_at < filters.until)
        if filters.state is not None:
            candidates = _could_be(filters.state)
            if candidates is not None:
                query = query.where(Message.id.in_(candidates))
        if position is not None:
            at, last_id = position
            query = query.where(
                Message.received_at <= at,
                or_(Message.received_at < at, Message.id < last_id),
            )
        return query.order_by(Message.received_at.desc(), Message.id.desc()).limit(limit)

    query = narrowed(select(Message))
    if not filters.text:
        return query
    pattern = f"%{_escape_like(filters.text)}%"
    # a message once however many of its copies match (a cut at `limit` counts messages)
    to_match = select(Delivery.message_id).where(Delivery.recipient.ilike(pattern, escape="\\"))
    if not by_index:
        return query.where(
            or_(Message.subject.ilike(pattern, escape="\\"), Message.id.in_(to_match))
        )
    by_subject = narrowed(select(Message.id).where(Message.subject.ilike(pattern, escape="\\")))
    by_recipient = narrowed(select(Message.id).where(Message.id.in_(to_match)))
    found = union(by_subject.subquery().select(), by_recipient.subquery().select())
    return query.where(Message.id.in_(found))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# the most candidates a state filter's walk folds in one round
_WALK_BATCH = 1000

# columns, not ORM objects: a page of 1,000 events skips the session's identity map
_EVENT_COLUMNS = (Event.seq, Event.at, Event.type, Event.message_id, Event.delivery_id, Event.data)


class Timeline:
    """Reads only; every method takes the caller's scope."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def messages(
        self,
        scope: MessageScope,
        filters: MessageFilter | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """A page of messages, newest first; `next_cursor` continues after its last one.

        Keyset pagination on (received_at, id): a message received while a client pages is
        neither repeated nor does it shift what the next page holds.
        """
        filters = filters or MessageFilter()
        position = decode_cursor(cursor) if cursor is not None else None
        async with self.db.snapshot() as session:
            if self.db.is_postgres and (filters.state is not None or filters.text):
                # The default (4) prices each index probe as a disk seek, so PostgreSQL
                # would scan every message to join a thousand candidates; with the table in
                # memory, or on SSD, a probe costs about what a sequential read does.
                await session.execute(text("SET LOCAL random_page_cost = 1.1"))
            if filters.state is None:
                query = _listing(scope, filters, position, limit + 1, by_index=self.db.is_postgres)
                rows = list((await session.scalars(query)).all())
                states = await self._states(session, [m.id for m in rows[:limit]])
            else:
                rows, states = await self._walk(session, scope, filters, position, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [_row(m, states.get(m.id, [])) for m in rows]
        last = rows[-1] if more and rows else None
        return Page(items, encode_cursor(last.received_at, last.id) if last else None)

    async def _walk(
        self,
        session: AsyncSession,
        scope: MessageScope,
        filters: MessageFilter,
        position: tuple[datetime, str] | None,
        wanted: int,
    ) -> tuple[list[Message], dict[str, list[RecipientRow]]]:
        """The first `wanted` messages with a recipient in the filter's state: the
        candidates in rounds, newest first, each round folded by `_states` (on its own rows
        alone), until enough matched or the candidates ran out. One snapshot, so exact."""
        assert filters.state is not None
        found: list[Message] = []
        states: dict[str, list[RecipientRow]] = {}
        batch = wanted  # most candidates match; when few do, the rounds grow
        while len(found) < wanted:
            query = _listing(scope, filters, position, batch, by_index=self.db.is_postgres)
            rows = list((await session.scalars(query)).all())
            folded = await self._states(session, [m.id for m in rows])
            for message in rows:
                if any(r.state == filters.state for r in folded.get(message.id, [])):
                    found.append(message)
                    states[message.id] = folded[message.id]
            if len(rows) < batch:
                break
            batch = min(batch * 4, _WALK_BATCH)
            position = (rows[-1].received_at, rows[-1].id)
        return found[:wanted], states

    @staticmethod
    async def _states(session: AsyncSession, ids: list[str]) -> dict[str, list[RecipientRow]]:
        if not ids:
            return {}
        found: dict[str, list[RecipientRow]] = {}
        for message_id, recipient, state in await session.execute(_states_for(ids)):
            found.setdefault(message_id, []).append(RecipientRow(recipient, RecipientState(state)))
        return found

    async def message(self, scope: MessageScope, message_id: str) -> MessageStory | None:
        """The message with each recipient's events in journal order; None when it does not
        exist or lies outside the scope."""
        query = select(Message).where(
            Message.id == message_id, Message.kind == MessageKind.SUBMITTED
        )
        narrowed = scope_clause(scope)
        if narrowed is not None:
            query = query.where(narrowed)
        async with self.db.snapshot() as session:
            found = await session.scalar(query)
            if found is None:
                return None
            states = (await self._states(session, [found.id])).get(found.id, [])
            events = (
                await session.scalars(
                    select(Event).where(Event.message_id == found.id).order_by(Event.id)
                )
            ).all()
            links = (
                await session.scalars(
                    select(Link)
                    .where(Link.message_id == found.id)
                    .order_by(Link.created_at, Link.id)
                )
            ).all()
            letters = (
                await session.scalars(select(Letter).where(Letter.message_id == found.id))
            ).all()
        row = _row(found, states)
        by_recipient: dict[str, list[EventRow]] = {r.address.lower(): [] for r in states}
        general: list[EventRow] = []
        for event in events:
            recipient = event.data.get("recipient")
            story = by_recipient.get(recipient.lower()) if isinstance(recipient, str) else None
            (story if story is not None else general).append(_event(event))
        return MessageStory(
            row,
            [
                RecipientStory(
                    r.address,
                    r.state,
                    by_recipient[r.address.lower()],
                    [
                        LinkRef(k.id, k.kind, k.expires_at, k.revoked_at)
                        for k in links
                        if k.recipient.lower() == r.address.lower()
                    ],
                    [
                        LetterRef(x.id, x.status)
                        for x in letters
                        if x.recipient.lower() == r.address.lower()
                    ],
                )
                for r in row.recipients
            ],
            general,
        )

    async def in_scope(self, scope: MessageScope, target: Target, target_id: str) -> bool:
        """Whether the message, or the message of the letter or link, exists and lies in the
        scope: the one check before an agent's action, so that a target outside the scope is
        refused exactly as an unknown one."""
        query = select(Message.id).where(Message.kind == MessageKind.SUBMITTED)
        if target is Target.MESSAGE:
            query = query.where(Message.id == target_id)
        elif target is Target.LETTER:
            query = query.join(Letter, Letter.message_id == Message.id).where(
                Letter.id == target_id
            )
        else:
            query = query.join(Link, Link.message_id == Message.id).where(Link.id == target_id)
        narrowed = scope_clause(scope)
        if narrowed is not None:
            query = query.where(narrowed)
        async with self.db.snapshot() as session:
            return await session.scalar(query.limit(1)) is not None

    async def events(
        self,
        scope: MessageScope,
        *,
        after_seq: int = 0,
        types: Sequence[str] = (),
        message_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRow]:
        """Chained events with a sequence number above `after_seq`, in journal order.

        The sequencer numbers events in passes that commit one after another, each with the
        chain's head (gateway/store/sequencer.py), so a seq is visible only once every lower
        one is: a reader that continues after the last number it saw misses nothing and sees
        nothing twice.
        """
        query = select(*_EVENT_COLUMNS).where(Event.seq > after_seq)
        if types:
            query = query.where(Event.type.in_(list(types)))
        if message_id is not None:
            query = query.where(Event.message_id == message_id)
        if since is not None:
            query = query.where(Event.at >= since)
        if until is not None:
            query = query.where(Event.at < until)
        narrowed = scope_clause(scope)
        if narrowed is not None:
            query = query.where(
                Event.message_id.in_(select(Message.id).where(narrowed)),
            )
        query = query.order_by(Event.seq).limit(limit)
        async with self.db.snapshot() as session:
            rows = (await session.execute(query)).all()
        return [EventRow(*row) for row in rows]


def _row(message: Message, recipients: list[RecipientRow]) -> MessageRow:
    return MessageRow(
        message.id,
        message.received_at,
        message.sender,
        message.subject,
        sorted(recipients, key=lambda r: r.address),
    )


def _event(event: Event) -> EventRow:
    return EventRow(
        event.seq, event.at, event.type, event.message_id, event.delivery_id, dict(event.data)
    )
