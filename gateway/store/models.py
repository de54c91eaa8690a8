"""The tables. Schema changes go through Alembic migrations in gateway/store/migrations."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """Opaque, roughly time-ordered: 12 hex digits of milliseconds, 8 of randomness."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC in Python on every backend; SQLite would otherwise hand back naive values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _in_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return _read_as_utc(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, the text SQLAlchemy's DATETIME writes, in one step: the group commit
        binds a dozen times a message, and the two processors' dict of parts between them
        cost more than the statements' own parameters."""
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name == "sqlite":
            return _from_sqlite_text
        return super().result_processor(dialect, coltype)


def _sqlite_text(value: datetime | None) -> str | None:
    """The instant in UTC as SQLAlchemy's SQLite DATETIME stores it, 2026-12-06
    05:30:00.000000: always six digits of microseconds, so that text order is time order."""
    if value is None:
        return None
    return _in_utc(value).isoformat(" ", "microseconds")[:-6]  # without its "+00:00"


def _from_sqlite_text(value: str | None) -> datetime | None:
    return None if value is None else _read_as_utc(datetime.fromisoformat(value))


def _in_utc(value: datetime) -> datetime:
    """`value` written to a UTC column: aware, or refused."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _read_as_utc(value: datetime) -> datetime:
    """A stored time as Python gets it: naive ones were stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Role(StrEnum):
    """What a console user or API caller may see and do; `gateway/access.py` holds the rules."""

    AGENT = "agent"  # their own messages
    TEAM_LEAD = "team_lead"  # their group's messages
    ADMIN = "admin"  # everything
    AUDITOR = "auditor"  # reads everything, changes nothing


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(
        String(20), default=Role.AGENT, server_default=Role.AGENT.value
    )
    group_name: Mapped[str | None] = mapped_column(String(100))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # base32 TOTP secret (RFC 6238) when the user turned on a second factor
    totp_secret: Mapped[str | None] = mapped_column(String(52))
    # the newest TOTP step a sign-in used; set by compare-and-set (gateway/console/totp.py)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    # the agent's mail notices, only what differs from the defaults (gateway/notices/prefs.py)
    notify: Mapped[dict[str, bool]] = mapped_column(JSON, default=dict, server_default="{}")
    # set when an admin deleted the user: the row stays because messages and the journal
    # name it (gateway/users.py delete_user); such a user no longer exists for anything else
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


class Alias(Base):
    """Another address an agent may send from (a team mailbox, an old address)."""

    __tablename__ = "aliases"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)


class MessageKind(StrEnum):
    SUBMITTED = "submitted"
    BOUNCE = "bounce"
    CONFIRMATION = "confirmation"


class Message(Base):
    """One accepted message; the raw bytes live in the blob store under `blob`."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_user_received", "user_id", "received_at"),
        Index("ix_messages_received", "received_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(20), default=MessageKind.SUBMITTED)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    sender: Mapped[str] = mapped_column(String(320))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    blob: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    message_id_header: Mapped[str] = mapped_column(String(998))
    subject: Mapped[str] = mapped_column(String(998), default="")
    helo: Mapped[str] = mapped_column(String(255), default="")
    peer: Mapped[str] = mapped_column(String(100), default="")
    protocol: Mapped[str] = mapped_column(String(20), default="ESMTP")
    # "SERVICE (entry NAME[, certificate CN])" when a trusted client sent it without AUTH
    trusted_client: Mapped[str | None] = mapped_column(String(300), default=None)
    # the [[smtp.trusted]] entry's name, what a route's `trusted` condition matches
    trusted_entry: Mapped[str | None] = mapped_column(String(100), default=None)
    # the DKIM body hash (relaxed, sha256) of a big signed original, kept by the intake so
    # that its delivery reads the blob once (gateway/outbound/stored_copy.py)
    body_hash: Mapped[str | None] = mapped_column(String(44), default=None)
    # the display name the From gives the sender ("" for none), which prospects' pages name;
    # null for a message stored before revision 0016, whose pages read it from the original
    # (so its original is kept while a link of it lives, gateway/store/blob_columns.py)
    sender_name: Mapped[str | None] = mapped_column(String(200), default=None)


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DELETED = "deleted"


class Delivery(Base):
    """One copy to one envelope recipient: the unit of the outbound queue.

    Copies that share a blob and are due together leave in one SMTP transaction; their state
    stays per recipient.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "status", "next_attempt_at"),
        Index("ix_deliveries_status_message", "status", "message_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    recipient: Mapped[str] = mapped_column(String(320))
    blob: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=DeliveryStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    leased_by: Mapped[str | None] = mapped_column(String(100))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    # a released original: the worker stores the DKIM-signed bytes it delivered (evidence)
    keep_signed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    signed_blob: Mapped[str | None] = mapped_column(String(64))
    # the [[routes]] entry (or "default") the last attempt took; null before the first
    route: Mapped[str | None] = mapped_column(String(100))


class Event(Base):
    """The journal: append-only, each chained row carrying the hash of the one before it.

    Writers insert a row with `seq`, `prev_hash` and `hash` empty (no lock but the row's
    own); the sequencer (gateway/store/sequencer.py) numbers and chains rows in `id` order
    shortly after. `id` is the order of writing, `seq` the order of the chain.
    """

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("seq", name="uq_events_seq"),
        Index("ix_events_message_order", "message_id", "id"),
        # the sequencer's work: rows not chained yet, in the order they were written
        Index(
            "ix_events_unchained",
            "id",
            postgresql_where=text("seq IS NULL"),
            sqlite_where=text("seq IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    seq: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    type: Mapped[str] = mapped_column(String(60), index=True)
    message_id: Mapped[str | None] = mapped_column(String(32))  # ix_events_message_order
    delivery_id: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class JournalHead(Base):
    """One row: the last chained sequence number and hash. The sequencer locks it while it
    chains; writers never touch it."""

    __tablename__ = "journal_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class StoredFile(Base):
    """An attachment taken out of a message; its bytes are the blob `sha256`."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class LinkKind(StrEnum):
    DOWNLOAD = "download"
    LETTER = "letter"


class Link(Base):
    """A personal link sent to one recipient. Only the token's sha256 is stored."""

    __tablename__ = "links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default=LinkKind.DOWNLOAD)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    recipient: Mapped[str] = mapped_column(String(320))
    language: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    expired: Mapped[bool] = mapped_column(Boolean, default=False)
    # set when an agent or admin ended the link before its time; the page says access ended
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class LinkFile(Base):
    """A file behind a link; `downloads` decides first against repeated download atomically."""

    __tablename__ = "link_files"

    link_id: Mapped[str] = mapped_column(
        ForeignKey("links.id", ondelete="CASCADE"), primary_key=True
    )
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    downloads: Mapped[int] = mapped_column(Integer, default=0)


class LetterStatus(StrEnum):
    HELD = "held"
    RELEASED = "released"
    EXPIRED = "expired"  # the link ran out without a consent; the agent was told


class Letter(Base):
    """An offer held for one recipient until they consent; `held_blob` is what is released.

    `blocks` is the snapshot of the consent texts as the letter carried them: the page shows
    exactly these, and the consent hashes exactly these.
    """

    __tablename__ = "letters"
    __table_args__ = (Index("ix_letters_status_message", "status", "message_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    recipient: Mapped[str] = mapped_column(String(320))
    link_id: Mapped[str] = mapped_column(ForeignKey("links.id"), unique=True)
    letter_blob: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=LetterStatus.HELD)
    language: Mapped[str] = mapped_column(String(10))
    subject: Mapped[str] = mapped_column(String(998))
    blocks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    button: Mapped[str] = mapped_column(String(300))
    texts_sha256: Mapped[str] = mapped_column(String(64))
    held_blob: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # when the agent was warned that the link runs out soon (never twice)
    expiry_warned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Consent(Base):
    """A prospect's declaration: what they saw, what they ticked, when and from where.

    Kept apart from the letter so that a later confirmation in text form (the prospect's own
    mail, § 126b BGB) can be attached to the same consent id.
    """

    __tablename__ = "consents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    letter_id: Mapped[str] = mapped_column(ForeignKey("letters.id"), unique=True)
    given_at: Mapped[datetime] = mapped_column(UtcDateTime)
    ip: Mapped[str] = mapped_column(String(45))
    user_agent: Mapped[str] = mapped_column(String(1000))
    blocks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    checked: Mapped[list[str]] = mapped_column(JSON)
    texts_sha256: Mapped[str] = mapped_column(String(64))
    letter_sent_at: Mapped[datetime] = mapped_column(UtcDateTime)
    pdf_blob: Mapped[str] = mapped_column(String(64))
    released_delivery_id: Mapped[str] = mapped_column(String(32))


class ConsoleSession(Base):
    """A login to the web console. `id` is the sha256 of the cookie's token, never the token."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
    ip: Mapped[str] = mapped_column(String(45), default="")
    user_agent: Mapped[str] = mapped_column(String(1000), default="")


class ApiKeyScope(StrEnum):
    READ = "read"
    WRITE = "write"


class ApiKey(Base):
    """A key for /api/v1. Shown once when created; only its sha256 and a prefix are kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(320), default="")
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookEndpoint(Base):
    """Where a CRM wants events pushed. `event_types` empty means every type."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(500), default="")
    event_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # ids only in payloads; the receiver fetches the rest through the API
    thin: Mapped[bool] = mapped_column(Boolean, default=False)
    # the admin allowed a loopback, link-local or private address (an on-premises CRM)
    allow_private: Mapped[bool] = mapped_column(Boolean, default=False)
    secret: Mapped[str] = mapped_column(String(100))
    # during a rotation the old secret signs too, until `previous_secret_until`
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookDeliveryStatus(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"  # given up, or the endpoint was disabled


class WebhookDelivery(Base):
    """One event to one endpoint: the unit of the webhook queue, claimed with a lease like
    a mail delivery. `message_id` keeps the order per message."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "event_seq"),
        # the claim's "no earlier event of this message still queued" (worker.claimable)
        Index("ix_webhook_deliveries_message", "endpoint_id", "message_id", "event_seq"),
        # the console's and the API's newest-first listing of an endpoint's deliveries
        Index("ix_webhook_deliveries_recent", "endpoint_id", "created_at", "event_seq"),
        # the endpoint page's figures: pending, failed in the last day, last success
        Index("ix_webhook_deliveries_outcome", "endpoint_id", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_seq: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(20), default=WebhookDeliveryStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    leased_by: Mapped[str | None] = mapped_column(String(100))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class WebhookCursor(Base):
    """One row: the last journal event fanned out to the webhook endpoints."""

    __tablename__ = "webhook_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class NoticeCursor(Base):
    """One row: the last ``download.first`` event the agent's notices have taken."""

    __tablename__ = "notice_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class AgentLogin(Base):
    """An agent's own login at their mail host, for hosts that refuse other From addresses.

    The password is only ever stored sealed (AES-GCM, bound to the user id) with a key kept
    outside the database (gateway/agent_logins.py); url and username are not secret.
    """

    __tablename__ = "agent_logins"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(String(300))
    username: Mapped[str] = mapped_column(String(320))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class InlineBlob(Base):
    """A small blob kept in the database instead of a file: the intake writes it in the
    transaction that commits the message naming it, so it costs no fsync of its own
    (gateway/store/inline_blobs.py). Read and swept through the blob store as files are."""

    __tablename__ = "inline_blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    written_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the last put, as a file's mtime
    data: Mapped[bytes] = mapped_column(LargeBinary)
