"""Every route names who may use it, and one middleware enforces it.

Routes are added through `Routes`, which makes a rule part of adding a route: public (the
prospect's pages, health, assets), or one permission of gateway/access.py on the console or
the API. The guard finds the rule of the matched route; a route without one is refused, so a
forgotten rule fails closed (and tests/web/test_route_rules.py fails). Who is asking comes
from the authenticators (an API key, a console session), the first that recognises the
request wins; the principal is then in `request[PRINCIPAL]` for the handler and its desk.

Denials: the API answers 401/403 as problem details; the console sends a visitor who is not
signed in to the sign-in page and answers 403 with the console's own page (`forbidden_page`,
rendered for the signed-in principal, so it keeps their navigation and language).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute, SystemRoute

from gateway.access import Permission, Principal
from web.problem_details import ProblemResponse
from web.raised_page import RaisedPage

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Authenticator = Callable[[web.Request], Awaitable[Principal | None]]
"""Returns who made the request, None when the request carries no credentials of its kind,
and raises (401 problem, redirect) when it carries credentials that do not hold."""


class Audience(StrEnum):
    PUBLIC = "public"
    CONSOLE = "console"
    API = "api"


@dataclass(frozen=True)
class Rule:
    audience: Audience
    needs: Permission | None = None


PUBLIC = Rule(Audience.PUBLIC)
PRINCIPAL = web.RequestKey("principal", Principal)
RULES = web.AppKey("route_rules", dict[AbstractRoute, Rule])
CONSOLE_LOGIN = "/console/login"


class Routes:
    """The app's router, where adding a route means saying who may use it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        if RULES not in app:
            app[RULES] = {}

    def public(self, method: str, path: str, handler: Handler) -> None:
        self._add(method, path, handler, PUBLIC)

    def public_static(self, prefix: str, directory: Path) -> None:
        resource = self.app.router.add_static(prefix, directory)
        for route in resource:
            self.app[RULES][route] = PUBLIC

    def console(self, method: str, path: str, handler: Handler, needs: Permission) -> None:
        self._add(method, path, handler, Rule(Audience.CONSOLE, needs))

    def api(self, method: str, path: str, handler: Handler, needs: Permission) -> None:
        self._add(method, path, handler, Rule(Audience.API, needs))

    def _add(self, method: str, path: str, handler: Handler, rule: Rule) -> None:
        router = self.app.router
        route = (
            router.add_get(path, handler)
            if method == "GET"
            else router.add_route(method, path, handler)
        )
        self.app[RULES][route] = rule
        for sibling in route.resource or ():  # the HEAD that aiohttp adds beside a GET
            self.app[RULES].setdefault(sibling, rule)


def rule_of(request: web.Request) -> Rule | None:
    return request.app[RULES].get(request.match_info.route)


def guard(
    authenticators: Sequence[Authenticator],
    forbidden_page: Callable[[web.Request], web.Response] | None = None,
    login_url: str = CONSOLE_LOGIN,
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`login_url` is the sign-in page as the browser reaches it (public_url's path first)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if isinstance(route, SystemRoute):  # aiohttp's own 404 and 405
            return await handler(request)
        rule = rule_of(request)
        if rule is None:
            log.error("route %s %s has no rule; refused", request.method, request.path)
            raise web.HTTPForbidden()
        if rule.audience is Audience.PUBLIC:
            return await handler(request)
        principal = await _who(request, authenticators)
        if principal is None:
            raise _not_signed_in(request, rule, login_url)
        assert rule.needs is not None
        request[PRINCIPAL] = principal
        if not principal.may(rule.needs):
            raise _forbidden(request, rule, principal, forbidden_page)
        return await handler(request)

    return middleware


async def _who(request: web.Request, authenticators: Sequence[Authenticator]) -> Principal | None:
    for authenticate in authenticators:
        principal = await authenticate(request)
        if principal is not None:
            return principal
    return None


def _not_signed_in(request: web.Request, rule: Rule, login_url: str) -> web.HTTPException:
    if rule.audience is Audience.API:
        return ProblemResponse(
            401,
            "Send an API key as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="sealrelay"'},
        )
    if request.method in ("GET", "HEAD"):  # `next` is our own path: the sign-in adds the prefix
        return web.HTTPSeeOther(f"{login_url}?next={quote(request.path_qs, safe='')}")
    return web.HTTPSeeOther(login_url)


def _forbidden(
    request: web.Request,
    rule: Rule,
    principal: Principal,
    page: Callable[[web.Request], web.Response] | None,
) -> web.HTTPException:
    log.info(
        "%s may not %s %s (needs %s)", principal.name, request.method, request.path, rule.needs
    )
    if rule.audience is Audience.API:
        return ProblemResponse(403, f"This key or user lacks the permission '{rule.needs}'.")
    if page is None:
        return web.HTTPForbidden(text="You may not do this.")
    return RaisedPage(page(request))
