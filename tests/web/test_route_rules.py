"""Every route of the web server names who may use it; one without a rule is refused.

Enumerates the real route table, so a route added without a rule fails here.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from gateway.access import Permission, Principal
from gateway.store.models import Role
from tests.conftest import Harness
from web.app import create_app
from web.guard import CONSOLE_LOGIN, PUBLIC, RULES, Audience, Routes, guard


async def test_every_route_has_a_rule(relay: Harness) -> None:
    app = create_app(relay.relay.web_parts())
    rules = app[RULES]
    missing = [
        f"{route.method} {route.resource.canonical if route.resource else '?'}"
        for route in app.router.routes()
        if route not in rules
    ]
    assert missing == []
    public = {
        route.resource.canonical
        for route, rule in rules.items()
        if rule is PUBLIC and route.resource is not None
    }
    # the sign-in page and the API's description (as OpenAPI tools expect) are the only
    # public paths under /console and /api
    allowed = {CONSOLE_LOGIN, "/api/v1/openapi.json"}
    assert not any(path.startswith(("/api", "/console")) for path in public - allowed)
    assert all(
        rule.needs is not None for rule in rules.values() if rule.audience != Audience.PUBLIC
    )


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_a_route_without_a_rule_is_refused_and_rules_are_enforced() -> None:
    reader = Principal.for_user(7, "audit@broker.example", Role.AUDITOR, None)

    async def as_auditor(request: web.Request) -> Principal | None:
        return reader if request.headers.get("X-Test-Who") == "auditor" else None

    app = web.Application(middlewares=[guard([as_auditor])])
    routes = Routes(app)
    routes.public("GET", "/open", _ok)
    routes.api("GET", "/api/v1/read", _ok, Permission.VIEW_MESSAGES)
    routes.api("POST", "/api/v1/change", _ok, Permission.MANAGE)
    routes.console("GET", "/console/things", _ok, Permission.VIEW_ADMIN)
    app.router.add_get("/forgotten", _ok)
    runner, base = await _serve(app)
    auditor = {"X-Test-Who": "auditor"}
    try:
        async with aiohttp.ClientSession() as http:

            async def status(method: str, path: str, **kw: object) -> int:
                async with http.request(method, base + path, allow_redirects=False, **kw) as r:  # type: ignore[arg-type]
                    return r.status

            assert await status("GET", "/open") == 200
            assert await status("HEAD", "/open") == 200
            assert await status("GET", "/forgotten") == 403
            assert await status("GET", "/nowhere") == 404
            assert await status("GET", "/api/v1/read") == 401
            assert await status("HEAD", "/api/v1/read") == 401
            assert await status("GET", "/api/v1/read", headers=auditor) == 200
            assert await status("POST", "/api/v1/change", headers=auditor) == 403
            assert await status("GET", "/console/things") == 303
            assert await status("GET", "/console/things", headers=auditor) == 200
            async with http.get(base + "/api/v1/read", allow_redirects=False) as r:
                assert r.content_type == "application/problem+json"
                assert (await r.json())["status"] == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(base + "/console/things?x=1", allow_redirects=False) as r:
                where = urlsplit(r.headers["Location"])
                assert where.path == "/console/login"
                assert parse_qs(where.query) == {"next": ["/console/things?x=1"]}
    finally:
        await runner.cleanup()
