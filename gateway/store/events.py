"""The journal's event types, each declared once: the contract the API and webhooks publish.

A CRM reads these names, so they say what happened to a message, a link or a letter. The
names are hashed into journals already stored: never rename one, add a new type instead.
Each declaration says which message and delivery an event names and what its payload holds
(a TypedDict, so mypy checks every payload written here and in its callers); the journal
refuses an event that does not match its declaration, so a mismatch is a programming
error the tests catch. `python -m gateway.store.event_docs` renders the catalog to docs/events.md.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Generic,
    NotRequired,
    Required,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

_STRICT = ConfigDict(strict=True, extra="forbid")
P = TypeVar("P", bound=Mapping[str, object])


class UndeclaredEvent(ValueError):
    """An event whose type, names or payload the catalog does not declare (a programming error)."""


@dataclass(frozen=True)
class About:
    """What a payload field means to a reader, and whether it is personal data (GDPR)."""

    meaning: str
    personal: bool = False


@dataclass(frozen=True)
class Field:
    """A payload field as docs/events.md lists it."""

    name: str
    type: Any
    meaning: str
    personal: bool
    optional: bool = False  # NotRequired: older events, or events of one kind, lack it


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its type's name, the message and delivery it names, its payload."""

    type: str
    message_id: str | None = None
    delivery_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventType(Generic[P]):
    """One declared event type. `message` and `delivery` say what the event's message_id and
    delivery_id name; None means the event never names one."""

    name: str
    meaning: str
    payload: type[P]
    message: str | None
    delivery: str | None = None

    def new(
        self, data: P, *, message_id: str | None = None, delivery_id: str | None = None
    ) -> NewEvent:
        return NewEvent(self.name, message_id, delivery_id, dict(data))

    def fields(self) -> Iterator[Field]:
        for name, hint in get_type_hints(self.payload, include_extras=True).items():
            optional = get_origin(hint) is NotRequired
            if get_origin(hint) in (NotRequired, Required):
                hint = get_args(hint)[0]
            about = next((a for a in get_args(hint) if isinstance(a, About)), About(""))
            kind = get_args(hint)[0] if get_origin(hint) is Annotated else hint
            yield Field(name, kind, about.meaning, about.personal, optional)

    @property
    def personal(self) -> bool:
        return any(f.personal for f in self.fields())

    def check(self, new: NewEvent) -> None:
        _check_reference(self.name, "message", self.message, new.message_id)
        _check_reference(self.name, "delivery", self.delivery, new.delivery_id)
        try:
            _adapter(self.payload).validate_python(new.data)
        except ValidationError as exc:
            raise UndeclaredEvent(
                f"{self.name}: the payload breaks its declaration: {exc}"
            ) from exc


CATALOG: dict[str, EventType[Any]] = {}


def _declare(
    name: str, meaning: str, payload: type[P], *, message: str | None, delivery: str | None = None
) -> EventType[P]:
    if name in CATALOG:
        raise ValueError(f"{name} is declared twice")
    CATALOG[name] = EventType(name, meaning, payload, message, delivery)
    return CATALOG[name]


@functools.cache
def _adapter(payload: type) -> TypeAdapter[Any]:
    return TypeAdapter(payload)


def _check_reference(name: str, what: str, meaning: str | None, value: str | None) -> None:
    if meaning is not None and value is None:
        raise UndeclaredEvent(f"{name} names a {what} ({meaning}); none was given")
    if meaning is None and value is not None:
        raise UndeclaredEvent(f"{name} names no {what}; {value!r} was given")


def check(new: NewEvent) -> None:
    """Raise UndeclaredEvent unless `new` is exactly as its type is declared."""
    event_type = CATALOG.get(new.type)
    if event_type is None:
        raise UndeclaredEvent(
            f"{new.type!r} is not a declared event type (gateway/store/events.py)"
        )
    event_type.check(new)


# -- fields that several events share ---------------------------------------------------------

Recipient = Annotated[str, About("The recipient's email address.", personal=True)]
Ip = Annotated[str, About("The visitor's IP address.", personal=True)]
UserAgent = Annotated[
    str, About("The visitor's browser as it named itself (User-Agent).", personal=True)
]
LinkId = Annotated[str, About("The link's id (never its token).")]
LetterId = Annotated[str, About("The registered letter's id.")]
Timestamp = Annotated[str, About("An ISO 8601 time with its UTC offset.")]
Attempt = Annotated[int, About("Which attempt this was for this copy: 1, 2, ...")]
Reply = Annotated[str, About("The upstream server's reply or the error met, as text.")]
Email = Annotated[str, About("The user's login address.", personal=True)]
FileName = Annotated[str, About("The attachment's file name.", personal=True)]
FileId = Annotated[str, About("The attachment's id.")]


@with_config(_STRICT)
class ToRecipient(TypedDict):
    recipient: Recipient


@with_config(_STRICT)
class Visit(TypedDict):
    recipient: Recipient
    ip: Ip
    user_agent: UserAgent


@with_config(_STRICT)
class UserChange(TypedDict):
    email: Email


# -- intake -------------------------------------------------------------------------------------


@with_config(_STRICT)
class MessageReceived(TypedDict):
    sender: Annotated[
        str, About("The envelope sender (MAIL FROM); empty for a null sender.", personal=True)
    ]
    recipients: Annotated[list[str], About("The envelope recipients.", personal=True)]
    size: Annotated[int, About("The message's size in bytes as received.")]
    subject: Annotated[str, About("The decoded Subject header.", personal=True)]
    message_id: Annotated[str, About("The Message-ID header (one is made when missing).")]
    user_id: Annotated[int | None, About("The agent who sent it; null for a trusted network.")]
    peer: Annotated[str, About("The sending client's IP address.", personal=True)]


MESSAGE_RECEIVED = _declare(
    "message.received",
    "An agent's message was accepted (the relay answered 250) and stored.",
    MessageReceived,
    message="the message received",
)


@with_config(_STRICT)
class PolicyKept(TypedDict):
    recipient: Recipient
    reason: Annotated[str, About("Why the attachments stayed, for the agent to read.")]


POLICY_KEPT = _declare(
    "policy.kept",
    "A recipient gets the message as the agent wrote it, attachments included, although"
    " the policy would have moved them behind a link (for example: the message is signed).",
    PolicyKept,
    message="the message",
)


@with_config(_STRICT)
class LanguageUnsupported(TypedDict):
    header: Annotated[str, About("The header the agent set.")]
    requested: Annotated[str, About("The language asked for (at most 100 characters).")]
    used: Annotated[
        dict[str, str],
        About("For each recipient address, the language used instead.", personal=True),
    ]


LANGUAGE_UNSUPPORTED = _declare(
    "language.unsupported",
    "The agent asked for a language the relay does not ship; the recipients got the texts"
    " in another one. A warning for the agent.",
    LanguageUnsupported,
    message="the message",
)


class WinmailUnpacked(TypedDict):
    files: Annotated[list[str], About("The names of the files it carried.", personal=True)]


WINMAIL_UNPACKED = _declare(
    "winmail.unpacked",
    "The message carried Outlook's winmail.dat (mail written in Rich Text), which a phone"
    " cannot open: copies to recipients outside the brokerage carry the files inside it"
    " instead (policy `unpack_winmail`), as do download links and registered letters."
    " Colleagues' copies keep it.",
    WinmailUnpacked,
    message="the message",
)


# -- download links -----------------------------------------------------------------------------


@with_config(_STRICT)
class LinkCreated(TypedDict):
    recipient: Recipient
    link_id: LinkId
    files: Annotated[list[str], About("The file names behind the link.", personal=True)]
    expires_at: Timestamp


LINK_CREATED = _declare(
    "link.created",
    "A recipient's attachments were moved behind a personal download link.",
    LinkCreated,
    message="the message whose attachments the link serves",
)


@with_config(_STRICT)
class LinkVisit(Visit):
    link_id: LinkId
    automated: NotRequired[
        Annotated[bool, About("True when the visit looks like a link scanner's, not a person's.")]
    ]
    automated_reasons: NotRequired[
        Annotated[list[str], About("Why the visit looks automated (rules/automated_visits.py).")]
    ]


LINK_VIEWED = _declare(
    "link.viewed",
    "Someone opened the download page of a valid link (a GET; link scanners do too).",
    LinkVisit,
    message="the message whose attachments the link serves",
)


@with_config(_STRICT)
class LinkExpired(TypedDict):
    link_id: LinkId
    recipient: Recipient
    kind: Annotated[str, About('What the link served: "download" or "letter".')]


LINK_EXPIRED = _declare(
    "link.expired",
    "A link reached the end of its validity and no longer serves anything.",
    LinkExpired,
    message="the message the link belongs to",
)


@with_config(_STRICT)
class FileDownload(LinkVisit):
    file_id: FileId
    filename: FileName


DOWNLOAD_FIRST = _declare(
    "download.first",
    "A file was downloaded through its link for the first time: the recipient has it.",
    FileDownload,
    message="the message the file came with",
)

DOWNLOAD_REPEAT = _declare(
    "download.repeat",
    "A file was downloaded through its link again.",
    FileDownload,
    message="the message the file came with",
)


@with_config(_STRICT)
class ZippedFile(TypedDict):
    file_id: FileId
    filename: FileName


@with_config(_STRICT)
class ZipDownload(LinkVisit):
    files: Annotated[list[ZippedFile], About("The files in the archive.", personal=True)]


DOWNLOAD_ZIP = _declare(
    "download.zip",
    "All files of a link were downloaded at once, as one ZIP archive.",
    ZipDownload,
    message="the message the files came with",
)


# -- registered letters -------------------------------------------------------------------------

TextsSha256 = Annotated[str, About("The sha256 of the legal texts shown, as hex.")]


@with_config(_STRICT)
class LetterHeld(TypedDict):
    recipient: Recipient
    letter_id: LetterId
    expires_at: Timestamp
    texts_sha256: TextsSha256


LETTER_HELD = _declare(
    "letter.held",
    "A registered letter went to a recipient; the offer itself is held until they consent.",
    LetterHeld,
    message="the agent's message (the offer)",
)


@with_config(_STRICT)
class LetterVisit(Visit):
    letter_id: LetterId
    automated: NotRequired[
        Annotated[bool, About("True when the visit looks like a link scanner's, not a person's.")]
    ]
    automated_reasons: NotRequired[
        Annotated[list[str], About("Why the visit looks automated (rules/automated_visits.py).")]
    ]


LETTER_VIEWED = _declare(
    "letter.viewed",
    "Someone opened the page of a registered letter that is still waiting for consent.",
    LetterVisit,
    message="the agent's message (the offer)",
)


@with_config(_STRICT)
class ConsentGiven(Visit):
    consent_id: Annotated[str, About("The consent's id, also in the released copy's headers.")]
    letter_id: LetterId
    texts_sha256: TextsSha256
    checked: Annotated[list[str], About("The ids of the boxes the recipient ticked.")]


CONSENT_GIVEN = _declare(
    "consent.given",
    "The recipient ticked every required box and confirmed: the legal evidence of consent.",
    ConsentGiven,
    message="the agent's message (the offer)",
)


@with_config(_STRICT)
class LetterReleased(TypedDict):
    consent_id: Annotated[str, About("The consent that released it.")]
    recipient: Recipient


LETTER_RELEASED = _declare(
    "letter.released",
    "After consent, the offer was queued to the recipient with the evidence headers.",
    LetterReleased,
    message="the agent's message (the offer)",
    delivery="the released copy to the recipient",
)


@with_config(_STRICT)
class LetterExpired(TypedDict):
    letter_id: LetterId
    recipient: Recipient
    expired_at: Timestamp
    notice_message_id: Annotated[
        str | None, About("The notice to the agent; null when none was sent.")
    ]


LETTER_EXPIRED = _declare(
    "letter.expired",
    "A registered letter's link expired without consent; the offer was never released.",
    LetterExpired,
    message="the agent's message (the offer)",
)


@with_config(_STRICT)
class RenewalRequested(TypedDict):
    letter_id: LetterId
    recipient: Recipient
    ip: Ip
    request_message_id: Annotated[str, About("The request mail queued to the agent.")]


LETTER_RENEWAL_REQUESTED = _declare(
    "letter.renewal_requested",
    "The recipient of an expired letter asked the agent for a new link; the agent was"
    " mailed (at most once a day per letter).",
    RenewalRequested,
    message="the agent's message (the offer)",
    delivery="the copy of the request mail to the agent",
)


# -- the outbound queue -------------------------------------------------------------------------

COPY = "the copy (one recipient of the message)"

DELIVERY_QUEUED = _declare(
    "delivery.queued",
    "A copy for one recipient was queued for delivery.",
    ToRecipient,
    message="the message the copy belongs to",
    delivery=COPY,
)


RouteTaken = Annotated[
    str,
    About(
        "The `[[routes]]` entry the attempt took (docs/routes.md), `default` for"
        " `[upstream]`, or `agent-login` when it left through the agent's own login at their"
        " mail host (docs/agent-logins.md). Events written before 2026-12 lack it."
    ),
]


@with_config(_STRICT)
class Delivered(TypedDict):
    recipient: Recipient
    attempt: Attempt
    remote: Annotated[str | None, About("The server that accepted it, when known.")]
    route: NotRequired[RouteTaken]


DELIVERY_DELIVERED = _declare(
    "delivery.delivered",
    "The upstream server accepted the copy: it is on its way to the recipient's inbox.",
    Delivered,
    message="the message the copy belongs to",
    delivery=COPY,
)


@with_config(_STRICT)
class Deferred(TypedDict):
    recipient: Recipient
    attempt: Attempt
    error: Reply
    next_attempt: Timestamp
    route: NotRequired[RouteTaken]


DELIVERY_DEFERRED = _declare(
    "delivery.deferred",
    "An attempt failed for now; the copy is tried again at `next_attempt`.",
    Deferred,
    message="the message the copy belongs to",
    delivery=COPY,
)


@with_config(_STRICT)
class Bounced(TypedDict):
    recipient: Recipient
    attempt: Attempt
    error: Reply
    status: Annotated[
        str,
        About(
            "The final status the bounce reports (RFC 3463): the refusal's own, e.g. 5.1.1,"
            " or 4.4.7 when the queue lifetime ran out. Events written before 2026-12 lack it."
        ),
    ]
    route: NotRequired[RouteTaken]


DELIVERY_BOUNCED = _declare(
    "delivery.bounced",
    "The copy could not be delivered and will not be tried again (refused for good, or"
    " its queue lifetime ran out); the sender gets a bounce.",
    Bounced,
    message="the message the copy belongs to",
    delivery=COPY,
)

DELIVERY_RETRIED = _declare(
    "delivery.retried",
    "An admin made the copy due now (a bounced one is queued again).",
    ToRecipient,
    message="the message the copy belongs to",
    delivery=COPY,
)

DELIVERY_DELETED = _declare(
    "delivery.deleted",
    "An admin gave up a queued copy; no bounce is sent.",
    ToRecipient,
    message="the message the copy belongs to",
    delivery=COPY,
)


@with_config(_STRICT)
class BounceQueued(TypedDict):
    original: Annotated[str, About("The message that bounced.")]
    recipient: Annotated[str, About("The bounce's recipient: the sender.", personal=True)]


BOUNCE_QUEUED = _declare(
    "bounce.queued",
    "A bounce (delivery status notification) to the sender was queued.",
    BounceQueued,
    message="the bounce message",
    delivery="the bounce's copy to the sender",
)


# -- housekeeping and users ---------------------------------------------------------------------


@with_config(_STRICT)
class BlobsDeleted(TypedDict):
    count: Annotated[int, About("How many stored files were deleted.")]
    bytes: Annotated[int, About("How many bytes that freed.")]


BLOBS_DELETED = _declare(
    "blobs.deleted",
    "The sweeper deleted stored files that nothing needs any longer.",
    BlobsDeleted,
    message=None,
)


@with_config(_STRICT)
class UserCreated(TypedDict):
    email: Email
    admin: Annotated[bool, About("Whether the user is an admin.")]
    role: NotRequired[
        Annotated[str, About("agent, team_lead, admin or auditor (absent before roles existed).")]
    ]


USER_CREATED = _declare("user.created", "A user (an agent) was added.", UserCreated, message=None)

USER_ENABLED = _declare(
    "user.enabled", "A user may send and sign in again.", UserChange, message=None
)

USER_DISABLED = _declare(
    "user.disabled", "A user may no longer send or sign in.", UserChange, message=None
)

USER_PASSWORD_CHANGED = _declare(
    "user.password_changed", "A user's password was set.", UserChange, message=None
)


# -- console ------------------------------------------------------------------------------------


@with_config(_STRICT)
class ConsoleSignIn(TypedDict):
    email: Email
    ip: Annotated[str, About("The address the sign-in came from.", personal=True)]
    user_agent: Annotated[str, About("The browser as it named itself.", personal=True)]


@with_config(_STRICT)
class ConsoleSignInFailed(TypedDict):
    login: Annotated[str, About("The login as typed (at most 320 characters).", personal=True)]
    ip: Annotated[str, About("The address the attempt came from.", personal=True)]
    reason: Annotated[str, About("'password' (login or password wrong) or 'code' (TOTP).")]


@with_config(_STRICT)
class ConsoleSignOutEverywhere(TypedDict):
    email: Email
    sessions: Annotated[int, About("How many sessions were ended.")]


CONSOLE_SIGNED_IN = _declare(
    "console.signed_in", "A user signed in to the web console.", ConsoleSignIn, message=None
)

CONSOLE_SIGN_IN_FAILED = _declare(
    "console.sign_in_failed",
    "A sign-in to the web console was refused: wrong login, password or code. Attempts"
    " refused by the throttle before any check are not recorded.",
    ConsoleSignInFailed,
    message=None,
)

CONSOLE_SIGNED_OUT = _declare(
    "console.signed_out", "A user signed out of the web console.", UserChange, message=None
)

CONSOLE_SIGNED_OUT_EVERYWHERE = _declare(
    "console.signed_out_everywhere",
    "A user ended all their console sessions, on every device.",
    ConsoleSignOutEverywhere,
    message=None,
)

USER_TOTP_ENABLED = _declare(
    "user.totp_enabled",
    "A user's sign-in to the console now also asks for a TOTP code.",
    UserChange,
    message=None,
)


@with_config(_STRICT)
class UserTotpDisabled(TypedDict):
    email: Email
    by: NotRequired[
        Annotated[
            str,
            About(
                "The admin who turned it off in the console; absent when it was the CLI.",
                personal=True,
            ),
        ]
    ]


USER_TOTP_DISABLED = _declare(
    "user.totp_disabled",
    "A user's sign-in to the console no longer asks for a TOTP code.",
    UserTotpDisabled,
    message=None,
)


# -- api ----------------------------------------------------------------------------------------

ApiKeyId = Annotated[str, About("The API key's id (never the key).")]
Actor = Annotated[str, About("Who did it: a user's address or an API key's name.", personal=True)]


@with_config(_STRICT)
class ApiKeyCreated(TypedDict):
    key_id: ApiKeyId
    name: Annotated[str, About("The name the admin gave the key.")]
    scope: Annotated[str, About('"read" or "write".')]
    prefix: Annotated[str, About("The key's first characters, to recognise it by.")]
    by: Actor


API_KEY_CREATED = _declare(
    "api_key.created",
    "An API key was created (the key was shown once).",
    ApiKeyCreated,
    message=None,
)


@with_config(_STRICT)
class ApiKeyRevoked(TypedDict):
    key_id: ApiKeyId
    name: Annotated[str, About("The key's name.")]
    by: Actor


API_KEY_REVOKED = _declare(
    "api_key.revoked",
    "An API key was revoked; it no longer authenticates.",
    ApiKeyRevoked,
    message=None,
)


@with_config(_STRICT)
class UserChanged(TypedDict):
    email: Email
    role: Annotated[str, About("The user's role after the change.")]
    group: Annotated[str | None, About("The user's group after the change; null for none.")]


USER_CHANGED = _declare(
    "user.changed", "A user's role or group was changed.", UserChanged, message=None
)


# -- agent actions ------------------------------------------------------------------------------

LinkKindField = Annotated[str, About('What the link serves: "download" or "letter".')]

DOWNLOAD_AUTOMATED = _declare(
    "download.automated",
    "A link scanner (not a person) fetched a file through its link; it counts as no download.",
    FileDownload,
    message="the message the file came with",
)


@with_config(_STRICT)
class LinkRevoked(TypedDict):
    link_id: LinkId
    recipient: Recipient
    kind: LinkKindField
    actor: Actor
    reason: Annotated[str, About("Why, as the agent wrote it (may be empty).")]


LINK_REVOKED = _declare(
    "link.revoked",
    "An agent or admin ended a recipient's link before its time; its page says access ended.",
    LinkRevoked,
    message="the message the link belongs to",
)


@with_config(_STRICT)
class LinkExtended(TypedDict):
    link_id: LinkId
    recipient: Recipient
    kind: LinkKindField
    actor: Actor
    expires_at: Timestamp
    previous_expires_at: Timestamp


LINK_EXTENDED = _declare(
    "link.extended",
    "An agent or admin gave a link a new expiry; an expired one opens again.",
    LinkExtended,
    message="the message the link belongs to",
)


@with_config(_STRICT)
class LetterResent(TypedDict):
    letter_id: LetterId
    recipient: Recipient
    actor: Actor
    link_id: Annotated[str, About("The letter's new link.")]
    previous_link_id: Annotated[str, About("The link that ended with the re-send.")]
    expires_at: Timestamp


LETTER_RESENT = _declare(
    "letter.resent",
    "An agent sent a held letter again with a fresh link; the old link ended. The texts are"
    " the same snapshot.",
    LetterResent,
    message="the agent's message (the offer)",
    delivery="the new letter's copy to the recipient",
)


@with_config(_STRICT)
class LetterReleasedByAgent(TypedDict):
    letter_id: LetterId
    recipient: Recipient
    actor: Actor
    reason: Annotated[str, About("Why the agent released it without consent.")]


LETTER_RELEASED_BY_AGENT = _declare(
    "letter.released_by_agent",
    "An agent released a held offer without the recipient's consent (no consent record; the"
    " released copy says so in a header).",
    LetterReleasedByAgent,
    message="the agent's message (the offer)",
    delivery="the released copy to the recipient",
)


# -- webhooks -----------------------------------------------------------------------------------
# Changes to endpoints only: each delivery attempt is kept in webhook_deliveries, never here,
# or every attempt would itself be an event to push.

EndpointId = Annotated[str, About("The webhook endpoint's id.")]
EndpointUrl = Annotated[str, About("Where the endpoint's events are posted.")]


@with_config(_STRICT)
class WebhookEndpointCreated(TypedDict):
    endpoint_id: EndpointId
    url: EndpointUrl
    event_types: Annotated[list[str], About("The event types it receives; empty: all.")]
    thin: Annotated[bool, About("Whether its payloads carry ids only, no personal fields.")]
    allow_private: Annotated[
        bool, About("Whether it may resolve to a loopback, link-local or private address.")
    ]
    by: Actor


WEBHOOK_ENDPOINT_CREATED = _declare(
    "webhook.endpoint_created",
    "An admin added a webhook endpoint; events from now on are posted to it.",
    WebhookEndpointCreated,
    message=None,
)


@with_config(_STRICT)
class WebhookEndpointChanged(TypedDict):
    endpoint_id: EndpointId
    changed: Annotated[
        list[str],
        About(
            "What changed: url, event_types, description, thin, allow_private, enabled"
            " or secret (a rotation; the secret itself is never journaled)."
        ),
    ]
    by: Actor


WEBHOOK_ENDPOINT_CHANGED = _declare(
    "webhook.endpoint_changed",
    "An admin changed a webhook endpoint (or enabled it again, or rotated its secret).",
    WebhookEndpointChanged,
    message=None,
)


@with_config(_STRICT)
class WebhookEndpointDisabled(TypedDict):
    endpoint_id: EndpointId
    reason: Annotated[
        str, About("Why: an admin's decision, the receiver answered 410, or days of failure.")
    ]
    by: Annotated[
        str, About("Who disabled it: a user's login address, cli, or relay.", personal=True)
    ]


WEBHOOK_ENDPOINT_DISABLED = _declare(
    "webhook.endpoint_disabled",
    "A webhook endpoint stopped receiving events; its queued deliveries were given up.",
    WebhookEndpointDisabled,
    message=None,
)


@with_config(_STRICT)
class WebhookEndpointDeleted(TypedDict):
    endpoint_id: EndpointId
    url: EndpointUrl
    by: Actor


@with_config(_STRICT)
class WebhookTestRequested(TypedDict):
    endpoint_id: Annotated[str, About("The endpoint the test is posted to (and only that one).")]
    by: Actor


WEBHOOK_TEST_REQUESTED = _declare(
    "webhook.test",
    "An admin asked for a test event; it is posted to the one endpoint it names, whatever"
    " types that endpoint receives.",
    WebhookTestRequested,
    message=None,
)

WEBHOOK_ENDPOINT_DELETED = _declare(
    "webhook.endpoint_deleted",
    "An admin deleted a webhook endpoint with its delivery history.",
    WebhookEndpointDeleted,
    message=None,
)


# -- notifications ------------------------------------------------------------------------------
# The agent's optional mails about their messages (gateway/notices/). The consent confirmation
# is not one of them: it carries the evidence and always goes (letter.released's transaction).


@with_config(_STRICT)
class DownloadNoticeQueued(TypedDict):
    recipient: Recipient
    file_ids: Annotated[list[str], About("The files whose first download the notice reports.")]
    first_seq: Annotated[int, About("The seq of the first download.first event it reports.")]
    notice_message_id: Annotated[str, About("The notice mail queued to the agent.")]


NOTICE_DOWNLOAD_QUEUED = _declare(
    "notice.download_queued",
    "The agent was mailed that a recipient downloaded files for the first time (one mail"
    " for the first downloads of one recipient that arrived together).",
    DownloadNoticeQueued,
    message="the agent's message the files came with",
)


@with_config(_STRICT)
class LetterExpiryWarned(TypedDict):
    letter_id: LetterId
    recipient: Recipient
    expires_at: Timestamp
    notice_message_id: Annotated[str, About("The warning mail queued to the agent.")]


LETTER_EXPIRY_WARNED = _declare(
    "letter.expiry_warned",
    "A registered letter still waits for consent and its link runs out soon: the agent was"
    " warned by mail (once per letter).",
    LetterExpiryWarned,
    message="the agent's message (the offer)",
)


@with_config(_STRICT)
class UserNoticesChanged(TypedDict):
    email: Email
    first_download: Annotated[bool, About("Whether the user now gets the first-download mail.")]
    expiry_warning: Annotated[bool, About("Whether the user now gets the expiry warning.")]


USER_NOTICES_CHANGED = _declare(
    "user.notices_changed",
    "A user's choice of optional mails changed (first downloads, letters about to expire);"
    " the payload holds the effective choice after the change.",
    UserNoticesChanged,
    message=None,
)


# -- admin-users: deleting users, resetting passwords, aliases ---------------------------------


@with_config(_STRICT)
class UserDeleted(TypedDict):
    email: Email
    aliases: Annotated[list[str], About("The aliases the user had; free again.", personal=True)]
    sessions: Annotated[int, About("How many console sessions were ended.")]
    by: Actor


USER_DELETED = _declare(
    "user.deleted",
    "An admin deleted a user: they can no longer send or sign in, their aliases are free, and"
    " their messages and journal stay (the address stays reserved for them).",
    UserDeleted,
    message=None,
)


@with_config(_STRICT)
class UserPasswordReset(TypedDict):
    email: Email
    sessions: Annotated[int, About("How many console sessions were ended.")]
    by: Actor


USER_PASSWORD_RESET = _declare(
    "user.password_reset",
    "An admin gave a user a new generated password (shown to the admin once, never"
    " recorded); the user's console sessions ended.",
    UserPasswordReset,
    message=None,
)


@with_config(_STRICT)
class UserAliasChange(TypedDict):
    email: Email
    alias: Annotated[str, About("The sender address added or removed.", personal=True)]
    by: Actor


USER_ALIAS_ADDED = _declare(
    "user.alias_added",
    "A user may now also send from another address.",
    UserAliasChange,
    message=None,
)

USER_ALIAS_REMOVED = _declare(
    "user.alias_removed",
    "A user may no longer send from one of their other addresses.",
    UserAliasChange,
    message=None,
)


# -- trusted-front: clients that send without AUTH (gateway/fronts/trusted.py)


@with_config(_STRICT)
class MessageTrustedClient(TypedDict):
    entry: Annotated[str, About("The [[smtp.trusted]] entry the client matched.")]
    service: Annotated[str, About("The entry's service name (the sending system).")]
    peer: Annotated[str, About("The client's IP address.", personal=True)]
    certificate: Annotated[
        str | None,
        About("The name in its verified TLS client certificate that matched; null without."),
    ]
    protocol: Annotated[str, About("ESMTPS with TLS, ESMTP without.")]


MESSAGE_TRUSTED_CLIENT = _declare(
    "message.trusted_client",
    "The message came from a trusted client without AUTH (a connector, a CRM, a scanner);"
    " written with message.received, it names which entry let it in.",
    MessageTrustedClient,
    message="the message received",
)


# -- loop-mark: the signed X-Sealrelay-Loop field (gateway/mail/loop_mark.py)


@with_config(_STRICT)
class MessageLoopMarkForged(TypedDict):
    relay: Annotated[
        str, About("The relay hostname the mark claims (h=); empty when it is malformed.")
    ]
    reason: Annotated[str, About("Why it does not verify with this relay's key.")]


MESSAGE_LOOP_MARK_FORGED = _declare(
    "message.loop_mark_forged",
    "The message carried an X-Sealrelay-Loop mark that does not verify with this relay's key"
    " (altered, copied from another message, or made with another key). It is no loop: the"
    " message was accepted and the mark removed from every copy.",
    MessageLoopMarkForged,
    message="the message received",
)


# -- milter: Postfix or Sendmail stays in charge (gateway/fronts/milter.py)


@with_config(_STRICT)
class MessageMilter(TypedDict):
    outcome: Annotated[
        str,
        About(
            "passed: every copy is the original, the MTA delivers it with our header added;"
            " taken_over: recipients get different copies, the relay delivers them and the"
            " MTA discards its own."
        ),
    ]
    mta_queue_id: Annotated[str | None, About("The MTA's queue id ({i}), when it sent one.")]
    login: Annotated[
        str | None, About("The MTA's SASL login ({auth_authen}); null without.", personal=True)
    ]


MESSAGE_MILTER = _declare(
    "message.milter",
    "The message came through the milter front; written with message.received, it says"
    " whether the MTA delivers it (passed) or the relay took it over.",
    MessageMilter,
    message="the message received",
)


# -- agent-logins: an agent's own login at their mail host (gateway/agent_logins.py)


@with_config(_STRICT)
class UserUpstreamLogin(TypedDict):
    email: Email
    url: Annotated[str, About("The agent's mail host, smtp:// or smtps://.")]
    username: Annotated[
        str, About("The login name at that host (never the password).", personal=True)
    ]
    by: Actor


USER_UPSTREAM_LOGIN_SET = _declare(
    "user.upstream_login_set",
    "A user's mail now leaves through their own login at their mail host; the password is"
    " stored sealed and is never recorded.",
    UserUpstreamLogin,
    message=None,
)

USER_UPSTREAM_LOGIN_CLEARED = _declare(
    "user.upstream_login_cleared",
    "A user's own upstream login was removed: their mail leaves the default way again.",
    UserUpstreamLogin,
    message=None,
)
