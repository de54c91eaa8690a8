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


class StoryEventOut(BaseModel):
    seq: int | None = Field(
        description="The journal's sequence number; null for an event written but not chained"
        " yet (the journal chains events within about a second; the event feed lists them"
        " from then on)."
    )
    at: datetime
    type: str
    message_id: str | None
    delivery_id: str | None
    data: dict[str, Any]


class LinkOut(BaseModel):
    id: str
    kind: str = Field(description="`download` or `letter`.")
    expires_at: datetime
    revoked_at: datetime | None


class LetterOut(BaseModel):
    id: str = Field(description="The id that /letters/{id}/... takes.")
    status: str = Field(description="`held`, `released` or `expired`.")


class RecipientStory(BaseModel):
    address: str = Field(description="The value that .../recipients/{recipient}/... takes.")
    state: RecipientState
    events: list[StoryEventOut]
    links: list[LinkOut] = Field(description="Download and letter links made for them.")
    letters: list[LetterOut] = Field(description="Registered letters to them.")


class MessageDetail(BaseModel):
    """A message with, per recipient, every event in the order it was written."""

    id: str
    received_at: datetime
    sender: str
    subject: str
    recipients: list[RecipientStory]
    events: list[StoryEventOut] = Field(description="Events that name no single recipient.")


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


class UserPassword(BaseModel):
    """The user's new generated password, shown this once; their console sessions ended."""

    email: str
    password: str


class AliasAdd(BaseModel):
    model_config = _BODY
    address: EmailStr = Field(max_length=320)


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
    route: str | None = Field(
        description="The `[[routes]]` entry the last attempt took (`default`: `[upstream]`);"
        " null before the first attempt."
    )


class QueueList(BaseModel):
    """Copies waiting for delivery or bounced, soonest due first."""

    items: list[QueueItem]


# -- what agents do to links and letters ----------------------------------------------------


class RevokeLinks(BaseModel):
    model_config = _BODY
    reason: str = Field("", max_length=500, description="Why; the journal keeps it.")


class ExtendLinks(BaseModel):
    model_config = _BODY
    until: AwareDatetime = Field(
        description="The new expiry, in the future, within the policy's maximum."
    )


class LinksChanged(BaseModel):
    """The links this call changed (none when they already were)."""

    link_ids: list[str]


class ReleaseLetter(BaseModel):
    model_config = _BODY
    reason: str = Field(
        min_length=1,
        max_length=500,
        pattern=r"\S",
        description="Why the offer goes out without consent; required, journaled.",
    )


class LetterQueued(BaseModel):
    """The copy queued to the recipient: the fresh letter, or the released offer."""

    letter_id: str
    delivery_id: str


# -- webhooks -------------------------------------------------------------------------------

EventTypes = Annotated[list[EventTypeName], Field(max_length=200)]
Url = Annotated[str, Field(min_length=1, max_length=2000)]


class WebhookOut(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str] = Field(description="Empty: every event type.")
    enabled: bool
    thin: bool = Field(description="Payloads carry ids only, no personal data.")
    allow_private: bool = Field(description="The URL may lead to a private address.")
    created_at: datetime
    disabled_reason: str | None
    failing_since: datetime | None
    previous_secret_until: datetime | None = Field(
        description="Until then the previous secret signs beside the current one."
    )


class WebhookList(BaseModel):
    """Every endpoint."""

    items: list[WebhookOut]


class WebhookCreate(BaseModel):
    model_config = _BODY
    url: Url
    event_types: EventTypes = Field(default_factory=list)
    description: str = Field("", max_length=500)
    enabled: bool = True
    thin: bool = False
    allow_private: bool = False


class WebhookCreated(WebhookOut):
    """The new endpoint; `secret` (whsec_...) is shown this once."""

    secret: str


class WebhookPatch(BaseModel):
    model_config = _BODY
    url: Url | None = None
    event_types: EventTypes | None = None
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = None
    thin: bool | None = None
    allow_private: bool | None = None


class WebhookSecret(BaseModel):
    """The new secret, shown this once; the previous one signs too until the time given."""

    secret: str
    previous_secret_until: datetime


class WebhookTest(BaseModel):
    """The `webhook.test` event journaled for this endpoint; its delivery is queued."""

    seq: int


class WebhookReplay(BaseModel):
    model_config = _BODY
    seq: int | None = Field(None, ge=1, le=2**62, description="One event, by its seq.")
    since: AwareDatetime | None = Field(
        None,
        description="Or every event of the endpoint's types at or after this time (events"
        " already queued for it are left out; more than 10,000 are refused) ...",
    )
    until: AwareDatetime | None = Field(None, description="... and before this time.")


class WebhookReplayed(BaseModel):
    """How many events were queued again for the endpoint."""

    queued: int


class DeliveriesQuery(BaseModel):
    model_config = _IN
    limit: int = Field(50, ge=1, le=500)


class WebhookDeliveryOut(BaseModel):
    id: str
    event_seq: int
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    updated_at: datetime


class WebhookDeliveries(BaseModel):
    """The endpoint's most recent deliveries, newest first."""

    items: list[WebhookDeliveryOut]
