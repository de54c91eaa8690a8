"""The operations of /api/v1, each declared once (web/api/declare.py).

Handlers call desks and shape their answers; a desk's refusal becomes a problem response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from gateway.access import Permission
from gateway.console.admin import QueueDesk, UserDesk
from gateway.console.api_keys import ApiKeyDesk, ApiKeyError, ApiKeyNotFound, KeyInfo
from gateway.console.timeline import BadCursor, EventRow, MessageFilter, Timeline
from gateway.outbound.queue import QueueError, UnknownDelivery
from gateway.store.models import DeliveryStatus, Role, User
from gateway.users import KEEP, UnknownUser, UserConflict, UserError, normalize_address
from web.api import models as m
from web.api.actions import MessageActions
from web.api.agent_logins import AgentLoginOperations
from web.api.declare import Call, NoBody, NoQuery, Operation, openapi
from web.api.problems import OPENAPI_PATH
from web.api.settings import SettingsOperations
from web.api.webhooks import WebhookOperations
from web.guard import Routes
from web.problem_details import ProblemResponse

_Out = TypeVar("_Out", m.EventOut, m.StoryEventOut)

PREFIX = "/api/v1"
VERSION = "1.0.0"


def _event(e: EventRow, out: type[_Out]) -> _Out:
    # from the journal, already of these types: built without validating again (a feed page
    # holds 1,000 of them)
    return out.model_construct(
        seq=e.seq,
        at=e.at,
        type=e.type,
        message_id=e.message_id,
        delivery_id=e.delivery_id,
        data=e.data,
    )


def _key(k: KeyInfo) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "scope": k.scope,
        "prefix": k.prefix,
        "created_at": k.created_at,
        "created_by": k.created_by,
        "last_used_at": k.last_used_at,
        "revoked_at": k.revoked_at,
    }


def _user(user: User, aliases: list[str]) -> dict[str, Any]:
    return {
        "email": user.email,
        "role": Role(user.role),
        "group": user.group_name,
        "disabled": user.disabled,
        "aliases": aliases,
        "created_at": user.created_at,
    }


@dataclass(frozen=True)
class Api:
    timeline: Timeline
    keys: ApiKeyDesk
    queue: QueueDesk
    users: UserDesk
    actions: MessageActions
    webhooks: WebhookOperations
    settings: SettingsOperations
    logins: AgentLoginOperations

    # -- messages and events --------------------------------------------------------------

    async def list_messages(self, call: Call[m.MessagesQuery, NoBody]) -> m.MessagePage:
        q = call.query
        try:
            page = await self.timeline.messages(
                call.principal.scope,
                MessageFilter(q.q, q.state, q.since, q.until),
                q.cursor,
                q.limit,
            )
        except BadCursor as exc:
            raise ProblemResponse(
                400, str(exc), errors=[{"parameter": "cursor", "message": str(exc)}]
            ) from exc
        return m.MessagePage(
            items=[
                m.MessageSummary(
                    id=row.id,
                    received_at=row.received_at,
                    sender=row.sender,
                    subject=row.subject,
                    recipients=[
                        m.Recipient(address=r.address, state=r.state) for r in row.recipients
                    ],
                )
                for row in page.items
            ],
            next_cursor=page.next_cursor,
        )

    async def get_message(self, call: Call[NoQuery, NoBody]) -> m.MessageDetail:
        story = await self.timeline.message(call.principal.scope, call.path["id"])
        if story is None:
            raise ProblemResponse(404, "No such message.")
        row = story.message
        return m.MessageDetail(
            id=row.id,
            received_at=row.received_at,
            sender=row.sender,
            subject=row.subject,
            recipients=[
                m.RecipientStory(
                    address=r.address,
                    state=r.state,
                    events=[_event(e, m.StoryEventOut) for e in r.events],
                    links=[
                        m.LinkOut(
                            id=k.id, kind=k.kind, expires_at=k.expires_at, revoked_at=k.revoked_at
                        )
                        for k in r.links
                    ],
                    letters=[m.LetterOut(id=x.id, status=x.status) for x in r.letters],
                )
                for r in story.recipients
            ],
            events=[_event(e, m.StoryEventOut) for e in story.events],
        )

    async def list_events(self, call: Call[m.EventsQuery, NoBody]) -> m.EventFeed:
        q = call.query
        rows = await self.timeline.events(
            call.principal.scope,
            after_seq=q.after,
            types=q.type,
            message_id=q.message_id,
            since=q.since,
            until=q.until,
            limit=q.limit,
        )
        # the feed reads the chained journal only: every row has its seq
        seqs = [e.seq for e in rows if e.seq is not None]
        return m.EventFeed(
            events=[_event(e, m.EventOut) for e in rows], next_after=seqs[-1] if seqs else q.after
        )

    # -- API keys ---------------------------------------------------------------------------

    async def list_api_keys(self, call: Call[NoQuery, NoBody]) -> m.ApiKeyList:
        return m.ApiKeyList(items=[m.ApiKeyOut(**_key(k)) for k in await self.keys.listing()])

    async def create_api_key(self, call: Call[NoQuery, m.ApiKeyCreate]) -> m.ApiKeyCreated:
        try:
            made = await self.keys.create(call.body.name, call.body.scope, call.principal.name)
        except ApiKeyError as exc:
            raise ProblemResponse.refused(422, exc) from exc
        return m.ApiKeyCreated(**_key(made.info), key=made.key)

    async def revoke_api_key(self, call: Call[NoQuery, NoBody]) -> None:
        try:
            await self.keys.revoke(call.path["id"], call.principal.name)
        except ApiKeyNotFound as exc:
            raise ProblemResponse(404, "No such API key.") from exc
        except ApiKeyError as exc:
            raise ProblemResponse.refused(409, exc) from exc

    # -- users ------------------------------------------------------------------------------

    async def list_users(self, call: Call[NoQuery, NoBody]) -> m.UserList:
        return m.UserList(items=[m.UserOut(**_user(u, a)) for u, a in await self.users.listing()])

    async def create_user(self, call: Call[NoQuery, m.UserCreate]) -> m.UserCreated:
        b = call.body
        try:
            user, aliases, password = await self.users.add(b.email, b.role, b.group, b.aliases)
        except UserError as exc:
            raise ProblemResponse.refused(
                409 if isinstance(exc, UserConflict) else 422, exc
            ) from exc
        return m.UserCreated(**_user(user, aliases), password=password)

    async def change_user(self, call: Call[NoQuery, m.UserPatch]) -> m.UserOut:
        b = call.body
        group = b.group if "group" in b.model_fields_set else KEEP
        try:
            user, aliases = await self.users.change(
                call.path["email"], role=b.role, group=group, disabled=b.disabled
            )
        except UserError as exc:
            raise _user_problem(exc) from exc
        return m.UserOut(**_user(user, aliases))

    async def delete_user(self, call: Call[NoQuery, NoBody]) -> None:
        try:
            await self.users.delete(call.path["email"], by=call.principal.name)
        except UserError as exc:
            raise _user_problem(exc) from exc

    async def reset_password(self, call: Call[NoQuery, NoBody]) -> m.UserPassword:
        try:
            password = await self.users.reset_password(call.path["email"], by=call.principal.name)
        except UserError as exc:
            raise _user_problem(exc) from exc
        return m.UserPassword(email=normalize_address(call.path["email"]), password=password)

    async def add_alias(self, call: Call[NoQuery, m.AliasAdd]) -> m.UserOut:
        try:
            await self.users.add_alias(
                call.path["email"], call.body.address, by=call.principal.name
            )
            user, aliases = await self.users.find(call.path["email"])
        except UserError as exc:
            raise _user_problem(exc, 422) from exc
        return m.UserOut(**_user(user, aliases))

    async def remove_alias(self, call: Call[NoQuery, NoBody]) -> None:
        try:
            await self.users.remove_alias(
                call.path["email"], call.path["alias"], by=call.principal.name
            )
        except UserError as exc:
            raise _user_problem(exc) from exc

    # -- the queue --------------------------------------------------------------------------

    async def list_queue(self, call: Call[m.QueueQuery, NoBody]) -> m.QueueList:
        statuses = call.query.status or [DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED]
        return m.QueueList(
            items=[
                m.QueueItem(
                    id=c.delivery.id,
                    message_id=c.message.id,
                    sender=c.message.sender,
                    subject=c.message.subject,
                    recipient=c.delivery.recipient,
                    status=c.delivery.status,
                    attempts=c.delivery.attempts,
                    next_attempt_at=c.delivery.next_attempt_at,
                    expires_at=c.delivery.expires_at,
                    last_error=c.delivery.last_error,
                    route=c.delivery.route,
                )
                for c in await self.queue.listing(statuses)
            ]
        )

    async def retry_delivery(self, call: Call[NoQuery, NoBody]) -> None:
        await _queue_action(self.queue.retry, call.path["id"])

    async def delete_delivery(self, call: Call[NoQuery, NoBody]) -> None:
        await _queue_action(self.queue.delete, call.path["id"])

    # -- the declarations -------------------------------------------------------------------

    def operations(self) -> list[Operation[Any, Any]]:
        read, admin, manage = Permission.VIEW_MESSAGES, Permission.VIEW_ADMIN, Permission.MANAGE
        p = PREFIX
        return [
            Operation("GET", f"{p}/messages", read, "List messages, newest first",
                      self.list_messages, m.MessagesQuery, NoBody, m.MessagePage),
            Operation("GET", f"{p}/messages/{{id}}", read,
                      "A message with its recipients and their events",
                      self.get_message, NoQuery, NoBody, m.MessageDetail, errors=(404,)),
            Operation("GET", f"{p}/events", read, "The event feed, in journal order",
                      self.list_events, m.EventsQuery, NoBody, m.EventFeed),
            Operation("GET", f"{p}/api-keys", admin, "List API keys",
                      self.list_api_keys, NoQuery, NoBody, m.ApiKeyList),
            Operation("POST", f"{p}/api-keys", manage, "Create an API key (shown once)",
                      self.create_api_key, NoQuery, m.ApiKeyCreate, m.ApiKeyCreated, 201),
            Operation("DELETE", f"{p}/api-keys/{{id}}", manage, "Revoke an API key",
                      self.revoke_api_key, NoQuery, NoBody, None, errors=(404, 409)),
            Operation("GET", f"{p}/users", admin, "List users",
                      self.list_users, NoQuery, NoBody, m.UserList),
            Operation("POST", f"{p}/users", manage,
                      "Create a user (the generated password is shown once)",
                      self.create_user, NoQuery, m.UserCreate, m.UserCreated, 201,
                      errors=(409,)),
            Operation("PATCH", f"{p}/users/{{email}}", manage,
                      "Disable or enable a user, change their role or group",
                      self.change_user, NoQuery, m.UserPatch, m.UserOut, errors=(404, 409)),
            Operation("DELETE", f"{p}/users/{{email}}", manage,
                      "Delete a user: sign-in, sessions and aliases end; messages and journal stay",
                      self.delete_user, NoQuery, NoBody, None, errors=(404, 409)),
            Operation("POST", f"{p}/users/{{email}}/password", manage,
                      "Reset a user's password (the generated one is shown once)",
                      self.reset_password, NoQuery, NoBody, m.UserPassword, errors=(404,)),
            Operation("POST", f"{p}/users/{{email}}/aliases", manage,
                      "Let a user also send from another address",
                      self.add_alias, NoQuery, m.AliasAdd, m.UserOut, 201, errors=(404, 409)),
            Operation("DELETE", f"{p}/users/{{email}}/aliases/{{alias}}", manage,
                      "Stop a user sending from one of their aliases",
                      self.remove_alias, NoQuery, NoBody, None, errors=(404,)),
            Operation("GET", f"{p}/queue", admin, "Copies queued or bounced, with the last error",
                      self.list_queue, m.QueueQuery, NoBody, m.QueueList),
            Operation("POST", f"{p}/queue/{{id}}/retry", manage, "Retry a copy now",
                      self.retry_delivery, NoQuery, NoBody, None, errors=(404, 409)),
            Operation("DELETE", f"{p}/queue/{{id}}", manage, "Give up a queued copy, no bounce",
                      self.delete_delivery, NoQuery, NoBody, None, errors=(404, 409)),
            *self.actions.operations(p),
            *self.webhooks.operations(p),
            *self.settings.operations(p),
            *self.logins.operations(p),
        ]  # fmt: skip

    def register(self, routes: Routes) -> None:
        operations = self.operations()
        for operation in operations:
            operation.register(routes)
        document = openapi(operations, "sealrelay API", VERSION)

        async def openapi_json(request: web.Request) -> web.Response:
            return web.json_response(document)

        routes.public("GET", OPENAPI_PATH, openapi_json)


def _user_problem(exc: UserError, invalid: int = 404) -> ProblemResponse:
    """404 for no such user (or alias), 409 when the users as they are forbid the change (the
    last admin, an address in use); `invalid` for an address that is none (404 when it came
    in the path: no user has it; 422 when in the body)."""
    if isinstance(exc, UnknownUser):
        return ProblemResponse.refused(404, exc)
    if isinstance(exc, UserConflict):
        return ProblemResponse.refused(409, exc)
    return ProblemResponse.refused(invalid, exc)


async def _queue_action(action: Any, delivery_id: str) -> None:
    try:
        await action(delivery_id)
    except QueueError as exc:
        status = 404 if isinstance(exc, UnknownDelivery) else 409
        raise ProblemResponse.refused(status, exc) from exc
