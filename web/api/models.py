"""The shapes the API takes and gives; the OpenAPI document is generated from these."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    WithJsonSchema,
)

from gateway.console.timeline import CURSOR_PATTERN, RecipientState
from gateway.store.events import CATALOG
from gateway.store.models import ApiKeyScope, Role

_IN = ConfigDict(extra="forbid")
# bodies are JSON: no coercion (0 is not false, "1" is not 1)
_BODY = ConfigDict(extra="forbid", strict=True)
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}[T ]")


def _iso_only(value: object) -> object:
    """A time in a query is ISO 8601 with its offset, never a number of seconds."""
    if isinstance(value, str) and not _ISO.match(value):
        raise ValueError("not an ISO 8601 date-time with a UTC offset")
    return value


Moment = Annotated[AwareDatetime, BeforeValidator(_iso_only)]


def _known_type(name: str) -> str:
    if name not in CATALOG:
        raise ValueError(f"unknown event type {name!r} (docs/events.md lists them)")
    return name


EventTypeName = Annotated[
    str,
    AfterValidator(_known_type),
    WithJsonSchema({"type": "string", "enum": sorted(CATALOG)}),
]


class MessagesQuery(BaseModel):
    model_config = _IN
    q: str | None = Field(
        None, max_length=200, description="Text in a recipient's address or the subject."
    )
    state: RecipientState | None = Field(
        None, description="Messages with at least one recipient in this state."
    )
    since: Moment | None = Field(None, description="Received at or after.")
    until: Moment | None = Field(None, description="Received before.")
    cursor: str | None = Field(
        None, pattern=CURSOR_PATTERN, description="`next_cursor` of the page before (opaque)."
    )
    limit: int = Field(50, ge=1, le=200)


class Recipient(BaseModel):
    address: str
    state: RecipientState


class MessageSummary(BaseModel):
    id: str
    received_at: datetime
    sender: str
    subject: str
    recipients: list[Recipient]


class MessagePage(BaseModel):
    """A page of messages, newest first."""

    items: list[MessageSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: none.")


class EventOut(BaseModel):
    seq: int = Field(description="The journal's sequence number: strictly increasing.")
    at: datetime
    type: str
    message_id: str | None
    delivery_id: str | None
    data: dict[str, Any]


class RecipientStory(BaseModel):
    address: str
    state: RecipientState
    events: list[EventOut]


class MessageDetail(BaseModel):
    """A message with, per recipient, every event in journal order."""

    id: str
    received_at: datetime
    sender: str
    subject: str
    recipients: list[RecipientStory]
    events: list[EventOut] = Field(description="Events that name no single recipient.")


class EventsQuery(BaseModel):
    model_config = _IN
    after: int = Field(0, ge=0, le=2**62, description="Events with a greater `seq`.")
    type: list[EventTypeName] = Field(default_factory=list, description="Only these types.")
    message_id: str | None = Field(None, max_length=32)
    since: Moment | None = Field(None, description="Events at or after.")
    until: Moment | None = Field(None, description="Events before.")
    limit: int = Field(100, ge=1, le=1000)


class EventFeed(BaseModel):
    """Events in journal order."""

    events: list[EventOut]
    next_after: int = Field(description="Pass as `after` to continue; the last `seq` seen.")


class ApiKeyOut(BaseModel):
    id: str
    name: str
    scope: ApiKeyScope
    prefix: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyList(BaseModel):
    """Every key, revoked ones too."""

    items: list[ApiKeyOut]


class ApiKeyCreate(BaseModel):
    model_config = _BODY
    name: str = Field(min_length=1, max_length=200, pattern=r"\S")
    scope: ApiKeyScope


class ApiKeyCreated(ApiKeyOut):
    """The new key; `key` is shown this once and never again."""

    key: str


class UserOut(BaseModel):
    email: str
    role: Role
    group: str | None
    disabled: bool
    aliases: list[str]
    created_at: datetime


class UserList(BaseModel):
    """Every user."""

    items: list[UserOut]


class UserCreate(BaseModel):
    model_config = _BODY
    email: EmailStr = Field(max_length=320)
    role: Role = Role.AGENT
    group: str | None = Field(None, min_length=1, max_length=100)
    aliases: list[Annotated[EmailStr, Field(max_length=320)]] = Field(
        default_factory=list, max_length=50
    )


class UserCreated(UserOut):
    """The new user; `password` (their SMTP and console password) is shown this once."""

    password: str


class UserPatch(BaseModel):
    model_config = _BODY
    disabled: bool | None = None
    role: Role | None = None
    group: str | None = Field(None, min_length=1, max_length=100, description="null: no group.")


class QueueQuery(BaseModel):
    model_config = _IN
    status: list[Annotated[str, Field(pattern="^(queued|bounced)$")]] = Field(
        default_factory=list, description="queued, bounced; both when not given."
    )


class QueueItem(BaseModel):
    id: str
    message_id: str
    sender: str
    subject: str
    recipient: str
    status: str
    attempts: int
    next_attempt_at: datetime
    expires_at: datetime
    last_error: str | None


class QueueList(BaseModel):
    """Copies waiting for delivery or bounced, soonest due first."""

    items: list[QueueItem]
