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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.access import Permission
from gateway.agent_logins import AgentLogins
from gateway.console.admin import QueueDesk, UserDesk
from gateway.console.api_keys import ApiKeyDesk, ApiKeyError
from gateway.outbound.queue import QueueError
from gateway.store.journal import ChainReport
from gateway.store.models import ApiKeyScope, DeliveryStatus, Role, WebhookDeliveryStatus
from gateway.texts.refusals import Refused
from gateway.users import UnknownUser, UserConflict, UserError, normalize_address
from gateway.webhooks.desk import (
    DeliveryView,
    EndpointDisabled,
    EndpointNotFound,
    NotATest,
    WebhookDesk,
    WebhookError,
)
from gateway.webhooks.tunables import REPLAY_LIMIT
from web.console.paths import ADMIN
from web.console.upstream_login import LoginRefused, apply_login_form
from web.console.view import ConsoleView, form_text
from web.guard import Routes

log = logging.getLogger(__name__)

USERS = ADMIN + "/users"
QUEUE = ADMIN + "/queue"
WEBHOOKS = ADMIN + "/webhooks"
KEYS = ADMIN + "/keys"
JOURNAL = ADMIN + "/journal"
POLICY = ADMIN + "/policy"
TEXTS = ADMIN + "/texts"
# Events wait for the sequencer about a second (database.chain_interval); a minute means
# no relay process is chaining them.
CHAIN_LATE_SECONDS = 60
DKIM = ADMIN + "/dkim"

TEST_REFRESH_SECONDS: Final = 2


@dataclass(frozen=True)
class TestOutcome:
    """A test event sent from the endpoint page, and its delivery once there is one."""

    seq: int
    delivery: DeliveryView | None
    enabled: bool

    @property
    def waiting(self) -> bool:
        """No answer from the receiver yet, and one may still come: not fanned out or not
        attempted, on an endpoint that is enabled."""
        if not self.enabled:
            return False
        return self.delivery is None or (
            self.delivery.status == WebhookDeliveryStatus.QUEUED and self.delivery.attempts == 0
        )


def _local_time(text: str, zone: ZoneInfo) -> datetime:
    """A `datetime-local` field's value, read in the branding zone (a zone given wins)."""
    at = datetime.fromisoformat(text)
    return at if at.tzinfo is not None else at.replace(tzinfo=zone)


class AdminPages:
    def __init__(
        self,
        view: ConsoleView,
        users: UserDesk,
        queue: QueueDesk,
        webhooks: WebhookDesk,
        keys: ApiKeyDesk,
        chain: Callable[[], Awaitable[ChainReport]],
        logins: AgentLogins,
    ) -> None:
        self.logins = logins
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
        routes.console("GET", USERS + "/delete", self.confirm_delete, change)
        routes.console("POST", USERS + "/delete", self.delete_user, change)
        routes.console("POST", USERS + "/password", self.reset_password, change)
        routes.console("POST", USERS + "/aliases", self.change_aliases, change)
        routes.console("POST", USERS + "/totp-off", self.turn_off_totp, change)
        routes.console("POST", USERS + "/upstream-login", self.change_login, change)
        routes.console("GET", QUEUE, self.queue_list, see)
        routes.console("POST", QUEUE + "/{id}/retry", self.retry, change)
        routes.console("POST", QUEUE + "/{id}/delete", self.delete, change)
        routes.console("GET", WEBHOOKS, self.endpoint_list, see)
        routes.console("POST", WEBHOOKS, self.add_endpoint, change)
        routes.console("GET", WEBHOOKS + "/{id}", self.endpoint, see)
        routes.console("POST", WEBHOOKS + "/{id}/enable", self.enable_endpoint, change)
        routes.console("POST", WEBHOOKS + "/{id}/disable", self.disable_endpoint, change)
        routes.console("POST", WEBHOOKS + "/{id}/replay", self.replay, change)
        routes.console("POST", WEBHOOKS + "/{id}/replay-range", self.replay_range, change)
        routes.console("POST", WEBHOOKS + "/{id}/edit", self.edit_endpoint, change)
        routes.console("POST", WEBHOOKS + "/{id}/rotate-secret", self.rotate_secret, change)
        routes.console("POST", WEBHOOKS + "/{id}/test", self.send_test, change)
        routes.console("GET", KEYS, self.key_list, see)
        routes.console("POST", KEYS, self.create_key, change)
        routes.console("POST", KEYS + "/{id}/revoke", self.revoke_key, change)
        routes.console("GET", JOURNAL, self.journal, see)

    async def _form(self, request: web.Request) -> dict[str, str]:
        posted = await request.post()
        return {k: form_text(v) for k, v in posted.items()}

    def _t(self, request: web.Request, key: str, **params: object) -> str:
        return self.view.catalog(request).t(key, **params)

    def _refused(self, request: web.Request, key: str, refusal: Refused) -> str:
        """`key`'s sentence around the desk's reason, both in the reader's language."""
        catalog = self.view.catalog(request)
        return catalog.t(key, detail=refusal.said(catalog))

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
                (POLICY, self._t(request, "work.config.policy_title")),
                (TEXTS, self._t(request, "work.config.texts_title")),
                (DKIM, self._t(request, "work.config.dkim_title")),
            ],
        )

    # -- users

    async def user_list(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        created: tuple[str, str] | None = None,
        reset: tuple[str, str] | None = None,
        status: int = 200,
        kept: Mapping[str, str] | None = None,
        login_typed: Mapping[str, str] | None = None,
    ) -> web.Response:
        """`kept`: what was typed into the add form, shown again with the error;
        `login_typed`: what was typed into one user's login form (`email` names whose)."""
        catalog = self.view.catalog(request)
        return self.view.render(
            request,
            "console/admin_users.html",
            catalog.t("work.users_title"),
            status=status,
            error=error,
            kept=kept or {},
            login_typed=login_typed or {},
            users=await self.users.listing(),
            logins=await self.logins.views(),
            roles=[(r.value, catalog.t(f"console.roles.{r.value}")) for r in Role],
            created=created,
            reset=reset,
            me=self.view.principal(request).name,
        )

    async def _user_refused(self, request: web.Request, exc: UserError) -> web.Response:
        """The users page with the reason: 404 for no such user, 409 when the users as they
        are forbid it (the last admin, oneself, an address in use), else 400."""
        status = (
            404 if isinstance(exc, UnknownUser) else 409 if isinstance(exc, UserConflict) else 400
        )
        return await self.user_list(
            request,
            error=self._refused(request, "work.error.user", exc),
            status=status,
        )

    async def add_user(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        try:
            role = Role(form.get("role", ""))
        except ValueError:
            return await self.user_list(
                request, error=self._t(request, "work.error.bad_role"), status=400, kept=form
            )
        aliases = [a for a in form.get("aliases", "").replace(",", " ").split() if a]
        try:
            user, _, password = await self.users.add(
                form.get("email", ""), role, form.get("group") or None, aliases
            )
        except UserError as exc:
            error = self._refused(request, "work.error.user", exc)
            return await self.user_list(request, error=error, status=400, kept=form)
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
        except UserError as exc:
            return await self._user_refused(request, exc)
        except ValueError:  # a role or an action the form does not offer
            key = "work.error.bad_role" if action == "save" else "admin_users.error.action"
            return await self.user_list(request, error=self._t(request, key), status=400)
        raise self.view.see_other(USERS, "user_changed")

    async def confirm_delete(self, request: web.Request) -> web.StreamResponse:
        """The confirmation step: says what deleting keeps and what it ends; a GET changes
        nothing."""
        try:
            user, aliases = await self.users.find(request.query.get("email", ""))
        except UserError as exc:
            return await self.user_list(
                request,
                error=self._refused(request, "work.error.user", exc),
                status=404,
            )
        return self.view.render(
            request,
            "console/admin_user_delete.html",
            self._t(request, "admin_users.delete_title", email=user.email),
            target=user,
            aliases=aliases,
            myself=user.email == self.view.principal(request).name,
        )

    async def delete_user(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        email = form.get("email", "")
        if not email or form.get("confirm", "") != email:
            return await self.user_list(
                request, error=self._t(request, "admin_users.error.unconfirmed"), status=400
            )
        by = self.view.principal(request).name
        try:
            await self.users.delete(email, by=by)
        except UserError as exc:
            return await self._user_refused(request, exc)
        log.info("console: %s deleted user %s", by, email)
        raise self.view.see_other(USERS, "user_deleted")

    async def reset_password(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        by = self.view.principal(request).name
        try:
            password = await self.users.reset_password(form.get("email", ""), by=by)
        except UserError as exc:
            return await self._user_refused(request, exc)
        email = normalize_address(form.get("email", ""))
        log.info("console: %s reset the password of %s", by, email)
        return await self.user_list(request, reset=(email, password))

    async def turn_off_totp(self, request: web.Request) -> web.StreamResponse:
        """The way back in for someone who lost their authenticator; they set it up again
        with `sealrelay user totp`. Not for oneself: another admin must vouch for the person."""
        form = await self._form(request)
        by = self.view.principal(request).name
        try:
            email = normalize_address(form.get("email", ""))
            if email == by:
                return await self.user_list(
                    request, error=self._t(request, "admin_users.error.own_totp"), status=409
                )
            await self.users.turn_off_totp(email, by=by)
        except UserError as exc:
            return await self._user_refused(request, exc)
        log.info("console: %s turned off TOTP for %s", by, email)
        raise self.view.see_other(USERS, "totp_off")

    async def change_aliases(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        by = self.view.principal(request).name
        email, address, action = form.get("email", ""), form.get("address", ""), form.get("action")
        try:
            if action == "add":
                await self.users.add_alias(email, address, by=by)
            elif action == "remove":
                await self.users.remove_alias(email, address, by=by)
            else:
                return await self.user_list(
                    request, error=self._t(request, "admin_users.error.action"), status=400
                )
        except UserError as exc:
            return await self._user_refused(request, exc)
        raise self.view.see_other(USERS, "alias_added" if action == "add" else "alias_removed")

    async def change_login(self, request: web.Request) -> web.StreamResponse:
        """Set or clear a user's own login at their mail host."""
        posted = await request.post()
        catalog = self.view.catalog(request)
        try:
            done = await apply_login_form(
                self.logins,
                form_text(posted.get("email")),
                posted,
                catalog,
                by=self.view.principal(request).name,
            )
        except LoginRefused as refused:
            typed = {**refused.typed, "email": form_text(posted.get("email"))}
            return await self.user_list(
                request, error=refused.message, status=refused.status, login_typed=typed
            )
        raise self.view.see_other(USERS, f"user_{done}")

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
                request,
                error=self._refused(request, "work.error.queue", exc),
                status=409,
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
        kept: Mapping[str, str] | None = None,
        login_typed: Mapping[str, str] | None = None,
    ) -> web.Response:
        """`kept`: what was typed into the add form, shown again with the error;
        `login_typed`: what was typed into one user's login form (`email` names whose)."""
        return self.view.render(
            request,
            "console/admin_webhooks.html",
            self._t(request, "work.webhooks_title"),
            status=status,
            error=error,
            kept=kept or {},
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
            error = self._refused(request, "work.error.webhook", exc)
            return await self.endpoint_list(request, error=error, status=400, kept=form)
        return await self.endpoint_list(request, secret=created.secret, status=201)

    async def endpoint(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        status: int = 200,
        secret: str | None = None,
        replayed: int | None = None,
        kept: dict[str, str] | None = None,
    ) -> web.Response:
        """The endpoint's page: figures, the outcome of a test just sent (`?test=SEQ`), the
        forms (test, rotate, replay a range, change) and the recent deliveries."""
        endpoint_id = request.match_info["id"]
        try:
            endpoint = await self.webhooks.get(endpoint_id)
            figures = await self.webhooks.figures(endpoint_id)
            test = await self._test_outcome(request, endpoint_id, endpoint.enabled)
            deliveries = await self.webhooks.deliveries(endpoint_id)
        except WebhookError:
            return self.view.not_found(request)
        catalog = self.view.catalog(request)
        now = datetime.now(catalog.zone).replace(second=0, microsecond=0, tzinfo=None)
        return self.view.render(
            request,
            "console/admin_webhook.html",
            endpoint.url,
            status=status,
            error=error,
            endpoint=endpoint,
            figures=figures,
            test=test,
            # a test still waiting for its answer: the page reloads itself until it has one
            refresh=TEST_REFRESH_SECONDS if test is not None and test.waiting else None,
            deliveries=deliveries,
            secret=secret,
            replayed=replayed,
            zone=f"{catalog.zone.key} ({catalog.zone_name(datetime.now(catalog.zone))})",
            kept=kept
            or {
                "since": (now - timedelta(days=1)).isoformat(timespec="minutes"),
                "until": now.isoformat(timespec="minutes"),
            },
            replay_limit=catalog.number(REPLAY_LIMIT, 0),
        )

    async def _test_outcome(
        self, request: web.Request, endpoint_id: str, enabled: bool
    ) -> TestOutcome | None:
        """The test named by `?test=SEQ`; none for anything else there."""
        try:
            seq = int(request.query.get("test", ""))
            return TestOutcome(seq, await self.webhooks.test_delivery(endpoint_id, seq), enabled)
        except (ValueError, NotATest):
            return None

    async def edit_endpoint(self, request: web.Request) -> web.StreamResponse:
        """Change URL, description, event types and payloads; a new URL is checked again."""
        form = await self._form(request)
        endpoint_id = request.match_info["id"]
        types = [t for t in form.get("event_types", "").replace(",", " ").split() if t]
        try:
            await self.webhooks.update(
                endpoint_id,
                url=form.get("url", ""),
                event_types=types,
                description=form.get("description", ""),
                thin=form.get("thin") == "yes",
                allow_private=form.get("allow_private") == "yes",
                by=self.view.principal(request).name,
            )
        except EndpointNotFound:
            return self.view.not_found(request)
        except WebhookError as exc:
            return await self.endpoint(
                request,
                error=self._refused(request, "work.error.webhook", exc),
                status=400,
            )
        raise self.view.see_other(f"{WEBHOOKS}/{endpoint_id}", "endpoint_changed")

    async def rotate_secret(self, request: web.Request) -> web.StreamResponse:
        """A new secret, shown on this answer only; the previous one keeps signing a while."""
        try:
            secret = await self.webhooks.rotate_secret(
                request.match_info["id"], by=self.view.principal(request).name
            )
        except WebhookError:
            return self.view.not_found(request)
        return await self.endpoint(request, secret=secret)

    async def send_test(self, request: web.Request) -> web.StreamResponse:
        endpoint_id = request.match_info["id"]
        try:
            seq = await self.webhooks.send_test(endpoint_id, by=self.view.principal(request).name)
        except EndpointNotFound:
            return self.view.not_found(request)
        except WebhookError as exc:
            return await self.endpoint(
                request,
                error=self._refused(request, "work.error.replay", exc),
                status=409,
            )
        raise web.HTTPSeeOther(self.view.site.url(f"{WEBHOOKS}/{endpoint_id}?test={seq}"))

    async def replay_range(self, request: web.Request) -> web.StreamResponse:
        """Queue again every event of the endpoint's types between two times of the branding
        zone; the page says how many."""
        form = await self._form(request)
        kept = {"since": form.get("since", ""), "until": form.get("until", "")}
        catalog = self.view.catalog(request)
        try:
            since, until = (_local_time(kept[k], catalog.zone) for k in ("since", "until"))
        except ValueError:
            return await self.endpoint(
                request, error=catalog.t("work.error.bad_time"), status=400, kept=kept
            )
        if since >= until:
            return await self.endpoint(
                request, error=catalog.t("work.error.range_reversed"), status=400, kept=kept
            )
        try:
            count = await self.webhooks.replay(request.match_info["id"], since=since, until=until)
        except EndpointNotFound:
            return self.view.not_found(request)
        except EndpointDisabled as exc:
            detail = catalog.t("work.error.replay", detail=exc.said(catalog))
            return await self.endpoint(request, error=detail, status=409, kept=kept)
        except WebhookError as exc:
            detail = catalog.t("work.error.replay", detail=exc.said(catalog))
            return await self.endpoint(request, error=detail, status=400, kept=kept)
        return await self.endpoint(request, replayed=count, status=202, kept=kept)

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
        except EndpointNotFound:
            return self.view.not_found(request)
        except WebhookError as exc:
            return await self.endpoint(
                request,
                error=self._refused(request, "work.error.webhook", exc),
                status=409,
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
        except ValueError:
            return await self.key_list(
                request, error=self._t(request, "work.error.bad_scope"), status=400
            )
        try:
            made = await self.keys.create(
                form.get("name", ""), scope, self.view.principal(request).name
            )
        except ApiKeyError as exc:
            return await self.key_list(
                request,
                error=self._refused(request, "work.error.key", exc),
                status=400,
            )
        return await self.key_list(request, key=made.key, status=201)

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.keys.revoke(request.match_info["id"], self.view.principal(request).name)
        except ApiKeyError as exc:
            return await self.key_list(
                request,
                error=self._refused(request, "work.error.key", exc),
                status=409,
            )
        raise self.view.see_other(KEYS, "key_revoked")

    # -- the journal

    async def journal(self, request: web.Request) -> web.StreamResponse:
        report = await self.chain()
        waited = report.lag.age(datetime.now(UTC))
        return self.view.render(
            request,
            "console/admin_journal.html",
            self._t(request, "work.journal_title"),
            report=report,
            waited=round(waited),
            late=waited > CHAIN_LATE_SECONDS,
        )
