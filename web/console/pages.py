"""The console's sign-in, sign-out and home pages, its authenticator and its CSRF gate.

Handlers call the `SessionDesk` and render; the desk owns every session write and journal
event. The authenticator reads the session cookie for console routes only (an API route must
never accept a cookie, or any site could make a signed-in browser call it), and
`csrf_gate` checks the token of every POST to a console route before its handler runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from gateway.access import Permission, Principal
from gateway.console.sessions import (
    Client,
    CodeNeeded,
    ConsoleUser,
    Refusal,
    SessionDesk,
    SignedIn,
    SignInRefused,
)
from gateway.texts.catalog import Catalog
from web.console.forms import FIELD, ConsoleForms, CsrfRefused
from web.console.paths import CONSOLE, HOME
from web.guard import CONSOLE_LOGIN, Audience, Routes, rule_of
from web.pages import STATIC, ProspectSite, digest, under

log = logging.getLogger(__name__)

CONSOLE_USER = web.RequestKey("console_user", ConsoleUser)
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' https: data:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: under no-referrer browsers send `Origin: null` with a
    # form POST, which the Origin check refuses
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path of ours, never another site."""
    if not target or not target.startswith(HOME) or target.startswith("//"):
        return HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return HOME
    return target


class ConsolePages:
    def __init__(self, site: ProspectSite, sessions: SessionDesk, forms: ConsoleForms) -> None:
        self.site = site
        self.sessions = sessions
        self.forms = forms
        version = digest((STATIC / "console.css").read_bytes())
        self.css = site.url(f"/static/console.css?v={version}")

    def register(self, routes: Routes) -> None:
        routes.public("GET", CONSOLE_LOGIN, self.login_page)
        routes.public("POST", CONSOLE_LOGIN, self.login)
        routes.console("GET", HOME, self.home, Permission.VIEW_MESSAGES)
        routes.console("GET", CONSOLE, self.to_home, Permission.VIEW_MESSAGES)
        routes.public("GET", "/", self.to_home)
        routes.console("POST", "/console/logout", self.logout, Permission.VIEW_MESSAGES)
        routes.console(
            "POST", "/console/logout-everywhere", self.logout_everywhere, Permission.VIEW_MESSAGES
        )
        routes.app.middlewares.append(self.csrf_gate)
        routes.app.on_response_prepare.append(self.add_headers)

    # -- the guard's parts

    async def authenticate(self, request: web.Request) -> Principal | None:
        """The signed-in user of a console route, from the session cookie."""
        rule = rule_of(request)
        if rule is None or rule.audience is not Audience.CONSOLE:
            return None
        user = await self.sessions.current(request.cookies.get(self.forms.cookies.session, ""))
        if user is None:
            return None
        request[CONSOLE_USER] = user
        return user.principal()

    @web.middleware
    async def csrf_gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rule = rule_of(request)
        if (
            request.method not in SAFE_METHODS
            and rule is not None
            and rule.audience is Audience.CONSOLE
        ):
            try:
                await self.forms.check_session_post(request, request[CONSOLE_USER].session_id)
            except CsrfRefused as exc:
                log.warning("console %s %s refused: %s", request.method, request.path, exc)
                return self._csrf_refused(request)
        return await handler(request)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if under(request.path, CONSOLE):
            response.headers.update(SECURITY_HEADERS)

    # -- pages

    async def to_home(self, request: web.Request) -> web.StreamResponse:
        """The addresses people type: the server's root and the console without its slash.
        Only staff go there (a prospect's links all lead further), so both lead to the
        console, which sends a visitor who is not signed in on to the sign-in page."""
        raise web.HTTPSeeOther(self.site.url(HOME))

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        target = safe_next(request.query.get("next"))
        token = request.cookies.get(self.forms.cookies.session)
        if token and await self.sessions.current(token) is not None:
            raise web.HTTPSeeOther(self.site.url(target))
        notice = {"out": "console.done_out", "everywhere": "console.done_everywhere"}
        return self._login_form(
            request, target=target, notice=notice.get(request.query.get("done", ""))
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.forms.check_login_post(request)
        except CsrfRefused as exc:
            log.warning("console sign-in refused: %s", exc)
            return self._csrf_refused(request)
        form = await request.post()
        target = safe_next(_text(form.get("next")))
        visitor = self.site.visitor(request)
        client = Client(visitor.ip, visitor.user_agent)
        replacing = request.cookies.get(self.forms.cookies.session)
        pending = _text(form.get("pending"))
        try:
            if pending:
                result: SignedIn | CodeNeeded = await self.sessions.confirm_code(
                    pending, _text(form.get("code")), client, replacing=replacing
                )
            else:
                result = await self.sessions.sign_in(
                    _text(form.get("email")),
                    _text(form.get("password")),
                    client,
                    replacing=replacing,
                )
        except SignInRefused as refused:
            email = _text(form.get("email"))[:320]
            return self._refused(request, refused.refusal, target, pending, email)
        match result:
            case CodeNeeded(pending=pending):
                return self._login_form(request, target=target, pending=pending)
            case SignedIn(token=token):
                response = web.HTTPSeeOther(self.site.url(target))
                response.set_cookie(
                    self.forms.cookies.session,
                    token,
                    path="/",
                    secure=self.forms.cookies.secure,
                    httponly=True,
                    samesite="Lax",
                )
                raise response

    async def home(self, request: web.Request) -> web.StreamResponse:
        user = request[CONSOLE_USER]
        catalog = self.site.catalog_for(request)
        return self._render(
            request,
            "console/home.html",
            catalog,
            title=catalog.t("console.home_title"),
            user=user,
            role=catalog.t(f"console.roles.{user.role.value}"),
            sessions=await self.sessions.open_sessions(user),
            signed_in=catalog.moment(user.signed_in_at),
            csrf=self.forms.for_session(user.session_id),
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        await self.sessions.sign_out(request[CONSOLE_USER])
        raise self._signed_out("out")

    async def logout_everywhere(self, request: web.Request) -> web.StreamResponse:
        await self.sessions.sign_out_everywhere(request[CONSOLE_USER])
        raise self._signed_out("everywhere")

    # -- helpers

    def _signed_out(self, done: str) -> web.HTTPSeeOther:
        response = web.HTTPSeeOther(self.site.url(f"{CONSOLE_LOGIN}?done={done}"))
        # a __Host- cookie is only replaced by one with the same flags, or it would stay
        response.del_cookie(
            self.forms.cookies.session,
            path="/",
            secure=self.forms.cookies.secure,
            httponly=True,
            samesite="Lax",
        )
        return response

    def _login_form(
        self,
        request: web.Request,
        *,
        target: str,
        pending: str | None = None,
        notice: str | None = None,
        error: str | None = None,
        status: int = 200,
        email: str = "",
    ) -> web.Response:
        catalog = self.site.catalog_for(request)
        nonce = request.cookies.get(self.forms.cookies.login) or self.forms.new_login_nonce()
        response = self._render(
            request,
            "console/login.html",
            catalog,
            status=status,
            title=catalog.t("console.login_title"),
            target=target,
            pending=pending,
            notice=catalog.t(notice) if notice else None,
            error=error,
            email=email,
            csrf=self.forms.for_login(nonce),
        )
        self.forms.set_login_cookie(response, nonce)
        return response

    def _refused(
        self, request: web.Request, refusal: Refusal, target: str, pending: str, email: str
    ) -> web.Response:
        catalog = self.site.catalog_for(request)
        if refusal is Refusal.THROTTLED:
            wait = self.sessions.throttle.per_address.forget_seconds
            response = self._render(
                request,
                "console/message.html",
                catalog,
                status=429,
                title=catalog.t("console.throttled_title"),
                message=catalog.t("console.throttled", minutes=max(1, math.ceil(wait / 60))),
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        if refusal is Refusal.EXPIRED:
            return self._login_form(
                request, target=target, error=catalog.t("console.code_expired"), status=401
            )
        if pending:
            return self._login_form(
                request,
                target=target,
                pending=pending,
                error=catalog.t("console.code_wrong"),
                status=401,
            )
        return self._login_form(
            request, target=target, error=catalog.t("console.wrong"), status=401, email=email
        )

    def _csrf_refused(self, request: web.Request) -> web.Response:
        catalog = self.site.catalog_for(request)
        return self._render(
            request,
            "console/message.html",
            catalog,
            status=403,
            title=catalog.t("console.csrf_title"),
            message=catalog.t("console.csrf"),
        )

    def _render(
        self,
        request: web.Request,
        template: str,
        catalog: Catalog,
        *,
        status: int = 200,
        **context: object,
    ) -> web.Response:
        context.setdefault("user", request.get(CONSOLE_USER))
        return self.site.render(
            request,
            template,
            catalog,
            status=status,
            console_css=self.css,
            field=FIELD,
            login_url=self.site.url(CONSOLE_LOGIN),
            **context,
        )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
