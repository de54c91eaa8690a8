"""The admins' console pages: users, the queue, webhook endpoints, API keys, and the journal's
chain status.

Seeing them needs VIEW_ADMIN (admins and auditors), changing anything MANAGE (admins): each
POST route is registered with MANAGE, so the guard refuses an auditor before a handler runs,
and the pages leave out the forms for whoever may not use them. Secrets (a new user's
password, an endpoint's signing secret, an API key) are shown once, on the answer to the POST
that made them, and never again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.access import Permission
from gateway.console.admin import QueueDesk, UserDesk
from gateway.console.api_keys import ApiKeyDesk, ApiKeyError
from gateway.outbound.queue import QueueError
from gateway.store.journal import ChainReport
from gateway.store.models import ApiKeyScope, DeliveryStatus, Role
from gateway.users import UserError
from gateway.webhooks.desk import WebhookDesk, WebhookError
from web.console.view import ConsoleView, form_text
from web.guard import Routes

log = logging.getLogger(__name__)

ADMIN = "/console/admin"
USERS = ADMIN + "/users"
QUEUE = ADMIN + "/queue"
WEBHOOKS = ADMIN + "/webhooks"
KEYS = ADMIN + "/keys"
JOURNAL = ADMIN + "/journal"


class AdminPages:
    def __init__(
        self,
        view: ConsoleView,
        users: UserDesk,
        queue: QueueDesk,
        webhooks: WebhookDesk,
        keys: ApiKeyDesk,
        chain: Callable[[], Awaitable[ChainReport]],
    ) -> None:
        self.view = view
        self.users = users
        self.queue = queue
        self.webhooks = webhooks
        self.keys = keys
        self.chain = chain

    def register(self, routes: Routes) -> None:
        see, change = Permission.VIEW_ADMIN, Permission.MANAGE
        routes.console("GET", ADMIN, self.overview, see)
        routes.console("GET", USERS, self.user_list, see)
        routes.console("POST", USERS, self.add_user, change)
        routes.console("POST", USERS + "/change", self.change_user, change)
        routes.console("GET", QUEUE, self.queue_list, see)
        routes.console("POST", QUEUE + "/{id}/retry", self.retry, change)
        routes.console("POST", QUEUE + "/{id}/delete", self.delete, change)
        routes.console("GET", WEBHOOKS, self.endpoint_list, see)
        routes.console("POST", WEBHOOKS, self.add_endpoint, change)
        routes.console("GET", WEBHOOKS + "/{id}", self.endpoint, see)
        routes.console("POST", WEBHOOKS + "/{id}/enable", self.enable_endpoint, change)
        routes.console("POST", WEBHOOKS + "/{id}/disable", self.disable_endpoint, change)
        routes.console("POST", WEBHOOKS + "/{id}/replay", self.replay, change)
        routes.console("GET", KEYS, self.key_list, see)
        routes.console("POST", KEYS, self.create_key, change)
        routes.console("POST", KEYS + "/{id}/revoke", self.revoke_key, change)
        routes.console("GET", JOURNAL, self.journal, see)

    async def _form(self, request: web.Request) -> dict[str, str]:
        posted = await request.post()
        return {k: form_text(v) for k, v in posted.items()}

    def _t(self, request: web.Request, key: str, **params: object) -> str:
        return self.view.catalog(request).t(key, **params)

    # -- overview

    async def overview(self, request: web.Request) -> web.StreamResponse:
        return self.view.render(
            request,
            "console/admin.html",
            self._t(request, "work.admin_title"),
            sections=[
                (USERS, self._t(request, "work.users_title")),
                (QUEUE, self._t(request, "work.queue_title")),
                (WEBHOOKS, self._t(request, "work.webhooks_title")),
                (KEYS, self._t(request, "work.keys_title")),
                (JOURNAL, self._t(request, "work.journal_title")),
            ],
        )

    # -- users

    async def user_list(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        created: tuple[str, str] | None = None,
        status: int = 200,
    ) -> web.Response:
        catalog = self.view.catalog(request)
        return self.view.render(
            request,
            "console/admin_users.html",
            catalog.t("work.users_title"),
            status=status,
            error=error,
            users=await self.users.listing(),
            roles=[(r.value, catalog.t(f"console.roles.{r.value}")) for r in Role],
            created=created,
        )

    async def add_user(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        try:
            role = Role(form.get("role", ""))
        except ValueError:
            return await self.user_list(
                request, error=self._t(request, "work.error.bad_role"), status=400
            )
        aliases = [a for a in form.get("aliases", "").replace(",", " ").split() if a]
        try:
            user, _, password = await self.users.add(
                form.get("email", ""), role, form.get("group") or None, aliases
            )
        except UserError as exc:
            return await self.user_list(
                request, error=self._t(request, "work.error.user", detail=str(exc)), status=400
            )
        log.info("console: %s added user %s", self.view.principal(request).name, user.email)
        return await self.user_list(request, created=(user.email, password), status=201)

    async def change_user(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        action = form.get("action", "")
        try:
            if action == "disable":
                await self.users.change(form.get("email", ""), disabled=True)
            elif action == "enable":
                await self.users.change(form.get("email", ""), disabled=False)
            elif action == "save":
                role = Role(form.get("role", ""))
                await self.users.change(
                    form.get("email", ""), role=role, group=form.get("group") or None
                )
            else:
                raise ValueError(action)
        except (UserError, ValueError) as exc:
            return await self.user_list(
                request, error=self._t(request, "work.error.user", detail=str(exc)), status=400
            )
        raise self.view.see_other(USERS, "user_changed")

    # -- the queue

    async def queue_list(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        catalog = self.view.catalog(request)
        return self.view.render(
            request,
            "console/admin_queue.html",
            catalog.t("work.queue_title"),
            status=status,
            error=error,
            rows=await self.queue.listing((DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED)),
        )

    async def retry(self, request: web.Request) -> web.StreamResponse:
        return await self._queue_action(request, self.queue.retry, "retried")

    async def delete(self, request: web.Request) -> web.StreamResponse:
        return await self._queue_action(request, self.queue.delete, "deleted")

    async def _queue_action(
        self, request: web.Request, action: Callable[[str], Awaitable[object]], done: str
    ) -> web.StreamResponse:
        try:
            await action(request.match_info["id"])
        except QueueError as exc:
            return await self.queue_list(
                request, error=self._t(request, "work.error.queue", detail=str(exc)), status=409
            )
        raise self.view.see_other(QUEUE, done)

    # -- webhooks

    async def endpoint_list(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        secret: str | None = None,
        status: int = 200,
    ) -> web.Response:
        return self.view.render(
            request,
            "console/admin_webhooks.html",
            self._t(request, "work.webhooks_title"),
            status=status,
            error=error,
            endpoints=await self.webhooks.list_endpoints(),
            secret=secret,
        )

    async def add_endpoint(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        types = [t for t in form.get("event_types", "").replace(",", " ").split() if t]
        try:
            created = await self.webhooks.create(
                form.get("url", ""),
                event_types=types,
                description=form.get("description", ""),
                thin=form.get("thin") == "yes",
                allow_private=form.get("allow_private") == "yes",
                by=self.view.principal(request).name,
            )
        except WebhookError as exc:
            return await self.endpoint_list(
                request, error=self._t(request, "work.error.webhook", detail=str(exc)), status=400
            )
        return await self.endpoint_list(request, secret=created.secret, status=201)

    async def endpoint(
        self, request: web.Request, *, error: str | None = None, status: int = 200
    ) -> web.Response:
        try:
            endpoint = await self.webhooks.get(request.match_info["id"])
        except WebhookError:
            return self.view.not_found(request)
        return self.view.render(
            request,
            "console/admin_webhook.html",
            endpoint.url,
            status=status,
            error=error,
            endpoint=endpoint,
            deliveries=await self.webhooks.deliveries(endpoint.id),
        )

    async def enable_endpoint(self, request: web.Request) -> web.StreamResponse:
        by = self.view.principal(request).name
        try:
            await self.webhooks.enable(request.match_info["id"], by=by)
        except WebhookError:
            return self.view.not_found(request)
        raise self.view.see_other(WEBHOOKS, "endpoint_enabled")

    async def disable_endpoint(self, request: web.Request) -> web.StreamResponse:
        by = self.view.principal(request).name
        try:
            await self.webhooks.disable(request.match_info["id"], by=by)
        except WebhookError:
            return self.view.not_found(request)
        raise self.view.see_other(WEBHOOKS, "endpoint_disabled")

    async def replay(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        endpoint_id = request.match_info["id"]
        try:
            seq = int(form.get("seq", ""))
        except ValueError:
            return await self.endpoint(
                request, error=self._t(request, "work.error.bad_seq"), status=400
            )
        try:
            await self.webhooks.replay(endpoint_id, seq=seq)
        except WebhookError as exc:
            return await self.endpoint(
                request, error=self._t(request, "work.error.webhook", detail=str(exc)), status=409
            )
        raise self.view.see_other(f"{WEBHOOKS}/{endpoint_id}", "replayed")

    # -- API keys

    async def key_list(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        key: str | None = None,
        status: int = 200,
    ) -> web.Response:
        return self.view.render(
            request,
            "console/admin_keys.html",
            self._t(request, "work.keys_title"),
            status=status,
            error=error,
            keys=await self.keys.listing(),
            scopes=[s.value for s in ApiKeyScope],
            key=key,
        )

    async def create_key(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        try:
            scope = ApiKeyScope(form.get("scope", ""))
            made = await self.keys.create(
                form.get("name", ""), scope, self.view.principal(request).name
            )
        except (ApiKeyError, ValueError) as exc:
            return await self.key_list(
                request, error=self._t(request, "work.error.key", detail=str(exc)), status=400
            )
        return await self.key_list(request, key=made.key, status=201)

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.keys.revoke(request.match_info["id"], self.view.principal(request).name)
        except ApiKeyError as exc:
            return await self.key_list(
                request, error=self._t(request, "work.error.key", detail=str(exc)), status=409
            )
        raise self.view.see_other(KEYS, "key_revoked")

    # -- the journal

    async def journal(self, request: web.Request) -> web.StreamResponse:
        report = await self.chain()
        return self.view.render(
            request,
            "console/admin_journal.html",
            self._t(request, "work.journal_title"),
            report=report,
        )
