"""The signed-in user's own page: which optional mails they get, their own password, and
their own login at their mail host (web/console/upstream_login.py).

Every role has it, for themselves only: the handlers act on the session's user and never on
an address from the form. Both forms are CSRF-checked by the console's gate like every
console POST. The current password is checked by the session desk in the sign-in throttle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from aiohttp import web

from gateway.access import Permission
from gateway.agent_logins import AgentLogins
from gateway.config import Settings
from gateway.console.admin import UserDesk
from gateway.console.sessions import Client, Refusal, SessionDesk, SignInRefused
from gateway.users import MIN_PASSWORD, NOTICE_KINDS, UserError
from web.console.pages import CONSOLE_USER
from web.console.paths import ACCOUNT
from web.console.upstream_login import LoginRefused, apply_login_form
from web.console.view import ConsoleView, form_text
from web.guard import Routes
from web.pages import ProspectSite

log = logging.getLogger(__name__)

PASSWORD_MAX = 1000


class AccountPages:
    def __init__(
        self,
        view: ConsoleView,
        site: ProspectSite,
        users: UserDesk,
        sessions: SessionDesk,
        settings: Settings,
        logins: AgentLogins,
    ) -> None:
        self.logins = logins
        self.view = view
        self.site = site
        self.users = users
        self.sessions = sessions
        self.settings = settings

    def register(self, routes: Routes) -> None:
        own = Permission.VIEW_MESSAGES  # every role, for themselves
        routes.console("GET", ACCOUNT, self.page, own)
        routes.console("POST", ACCOUNT + "/notices", self.save_notices, own)
        routes.console("POST", ACCOUNT + "/password", self.change_password, own)
        routes.console("POST", ACCOUNT + "/upstream-login", self.change_login, own)

    async def page(
        self,
        request: web.Request,
        *,
        error: str | None = None,
        password_error: str | None = None,
        login_error: str | None = None,
        login_typed: Mapping[str, str] | None = None,
        status: int = 200,
    ) -> web.Response:
        catalog = self.view.catalog(request)
        user = request[CONSOLE_USER]
        return self.view.render(
            request,
            "console/account.html",
            catalog.t("account.title"),
            status=status,
            error=error,
            password_error=password_error,
            login_error=login_error,
            login_typed=login_typed or {},
            min_password=MIN_PASSWORD,
            prefs=await self.users.notices(user.email, self.settings),
            login=await self.logins.show(user.email),
        )

    async def save_notices(self, request: web.Request) -> web.StreamResponse:
        posted = await request.post()
        if form_text(posted.get("notices")) != "1":  # the form's marker: an empty post is no choice
            return await self.page(
                request, error=self.view.catalog(request).t("account.error.form"), status=400
            )
        changes = {kind: form_text(posted.get(kind)) == "yes" for kind in NOTICE_KINDS}
        user = request[CONSOLE_USER]
        await self.users.set_notices(user.email, changes, self.settings)
        raise self.view.see_other(ACCOUNT, "notices_saved")

    async def change_password(self, request: web.Request) -> web.StreamResponse:
        posted = await request.post()
        current = form_text(posted.get("current"), PASSWORD_MAX)
        new = form_text(posted.get("new"), PASSWORD_MAX)
        repeat = form_text(posted.get("repeat"), PASSWORD_MAX)
        catalog = self.view.catalog(request)

        if not current or not new:
            return await self.page(
                request, password_error=catalog.t("account.error.missing"), status=400
            )
        if new != repeat:
            return await self.page(
                request, password_error=catalog.t("account.error.repeat"), status=400
            )
        if len(new) < MIN_PASSWORD:
            return await self.page(
                request,
                password_error=catalog.t("account.error.short", minimum=MIN_PASSWORD),
                status=400,
            )
        visitor = self.site.visitor(request)
        try:
            await self.sessions.change_password(
                request[CONSOLE_USER], current, new, Client(visitor.ip, visitor.user_agent)
            )
        except SignInRefused as exc:
            if exc.refusal is Refusal.THROTTLED:
                wait = self.sessions.throttle.per_address.forget_seconds
                response = await self.page(
                    request,
                    password_error=catalog.t(
                        "console.throttled", minutes=max(1, math.ceil(wait / 60))
                    ),
                    status=429,
                )
                response.headers["Retry-After"] = str(math.ceil(wait))
                return response
            return await self.page(
                request, password_error=catalog.t("account.error.current"), status=400
            )
        except UserError as exc:
            log.info("console: password change refused: %s", exc)
            return await self.page(
                request,
                password_error=catalog.t("account.error.short", minimum=MIN_PASSWORD),
                status=400,
            )
        raise self.view.see_other(ACCOUNT, "password_changed")

    async def change_login(self, request: web.Request) -> web.StreamResponse:
        """Set or clear the user's own login at their mail host: always their own."""
        user = request[CONSOLE_USER]
        catalog = self.view.catalog(request)
        try:
            done = await apply_login_form(
                self.logins, user.email, await request.post(), catalog, by=user.email
            )
        except LoginRefused as refused:
            return await self.page(
                request,
                login_error=refused.message,
                login_typed=refused.typed,
                status=refused.status,
            )
        raise self.view.see_other(ACCOUNT, done)
