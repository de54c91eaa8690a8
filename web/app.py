"""The web server: health, metrics, the prospect's pages (downloads, registered letters),
the console (web/console/) and the JSON API (web/api/).

The web receives its parts (`WebParts`) from the composition root: the desks that own every
write, the blob store, the clock, the settings and the two database questions of /healthz
and /metrics. It never sees the relay itself, and holds no SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.access import Permission
from gateway.agent_logins import AgentLogins
from gateway.config import Settings
from gateway.console.admin import QueueDesk, UserDesk
from gateway.console.api_keys import ApiKeyDesk
from gateway.console.sessions import SessionDesk
from gateway.console.timeline import Timeline
from gateway.console.waiting import WaitingLetters
from gateway.dns_lookup import DnsLookup
from gateway.letters.desk import LetterDesk
from gateway.links.desk import LinkDesk
from gateway.store.admission import Admission, Busy, visiting
from gateway.store.blobs import BlobStore, StoreUnavailable
from gateway.store.journal import ChainReport, Lag
from gateway.store.metrics import JOURNAL_LAG, JOURNAL_UNCHAINED, QUEUE_DEPTH
from gateway.webhooks.desk import WebhookDesk
from web.api.actions import MessageActions
from web.api.agent_logins import AgentLoginOperations
from web.api.auth import bearer_authenticator
from web.api.problems import API_PREFIX, api_problems
from web.api.routes import Api
from web.api.settings import SettingsOperations
from web.api.webhooks import WebhookOperations
from web.console.account import AccountPages
from web.console.actions import ActionPages
from web.console.admin import AdminPages
from web.console.admin_config import ConfigPages
from web.console.forms import ConsoleForms
from web.console.pages import ConsolePages
from web.console.timeline import TimelinePages
from web.console.view import ConsoleView
from web.csrf import key_path
from web.downloads import DownloadPages
from web.guard import CONSOLE_LOGIN, Handler, Routes, guard
from web.letters import LetterPages
from web.pages import ProspectSite
from web.raised_page import RaisedPage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebParts:
    """Everything the web server works with."""

    settings: Settings
    links: LinkDesk
    letters: LetterDesk
    sessions: SessionDesk
    blobs: BlobStore
    clock: Callable[[], datetime]
    # returns when the database answers, raises what reaching it raised
    health: Callable[[], Awaitable[None]]
    # deliveries per status, every status named
    queue_depths: Callable[[], Awaitable[Mapping[str, int]]]
    # the journal's events not chained yet (gateway/store/health.py journal_lag)
    journal_lag: Callable[[], Awaitable[Lag]]
    roles: frozenset[str]
    timeline: Timeline
    api_keys: ApiKeyDesk
    queue: QueueDesk
    users: UserDesk
    webhooks: WebhookDesk
    waiting: WaitingLetters
    agent_logins: AgentLogins
    # walks the journal's hash chain (gateway/store/journal.py verify_database)
    chain: Callable[[], Awaitable[ChainReport]]
    # why the blob store is unavailable, None while it answers (gateway/store/health.py)
    store_problem: Callable[[], str | None] = lambda: None


PARTS = web.AppKey("parts", WebParts)
ADMISSION = web.AppKey("admission", Admission)
# the prospect's pages: download links (web/downloads.py) and registered letters (web/letters.py)
VISIT_PATHS = ("/d/", "/l/")


async def healthz(request: web.Request) -> web.Response:
    """Ready when the database and the blob store answer; load balancers and orchestrators
    poll this. A relay without its blob store runs on, degraded, and is whole again once
    the store answers: 503 says "send no work here now", not "restart me"."""
    parts = request.app[PARTS]
    try:
        await parts.health()
    except Exception as exc:
        # The exception names hosts, ports and SQL; the public may only learn that it failed.
        log.warning("healthz: database unavailable: %s", exc)
        return web.json_response({"status": "error", "database": "unavailable"}, status=503)
    if (problem := parts.store_problem()) is not None:
        log.warning("healthz: blob store unavailable: %s", problem)
        return web.json_response(
            {"status": "degraded", "database": "ok", "blob_store": "unavailable"}, status=503
        )
    return web.json_response({"status": "ok", "roles": sorted(parts.roles)})


async def metrics(request: web.Request) -> web.Response:
    for status, count in (await request.app[PARTS].queue_depths()).items():
        QUEUE_DEPTH.labels(status=status).set(count)
    lag = await request.app[PARTS].journal_lag()
    JOURNAL_UNCHAINED.set(lag.unchained)
    JOURNAL_LAG.set(lag.age(request.app[PARTS].clock()))
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def store_unavailable(site: ProspectSite) -> Callable[..., Awaitable[web.StreamResponse]]:
    """503 with Retry-After for any request the blob store failed, in the browser's language:
    the net under the pages that answer it in their link's language themselves."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            log.warning("%s %s: blob store unavailable: %s", request.method, request.path, exc)
            raise RaisedPage(site.unavailable(request, site.catalog_for(request))) from exc

    return middleware


def unknown_paths(site: ProspectSite) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A path no route knows gets the link-not-found page in the browser's language, not
    aiohttp's bare "404: Not Found": whoever lands there most likely followed a link that a
    mail program cut short or ran into the next word. The API keeps its problem details, and
    a GET under /console/ has the console's own 404 (register_console_work)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if (
            isinstance(route, SystemRoute)
            and route.status == 404
            and not request.path.startswith(API_PREFIX)
        ):
            return site.not_found(request, site.catalog_for(request))
        return await handler(request)

    return middleware


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """Without a version: aiohttp would name itself and Python with theirs on every
    response, which tells a scanner what to try (the SMTP greeting names none either).
    A request too malformed to parse is still answered by aiohttp before any hook of the
    app; a reverse proxy in front answers those itself."""
    response.headers["Server"] = "sealrelay"


def visits_admitted(
    site: ProspectSite, admission: Admission
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A prospect's request (a download or letter page, a file) uses the database under
    `admission`; turned away, it is answered 503 with Retry-After at once, in the browser's
    language, rather than after waiting for a connection the relay needs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(VISIT_PATHS):
            return await handler(request)
        try:
            with visiting(admission):
                return await handler(request)
        except Busy:
            log.info("%s %s: busy, answered 503", request.method, request.path)
            raise RaisedPage(site.busy(request, site.catalog_for(request))) from None

    return middleware


def create_app(parts: WebParts) -> web.Application:
    settings = parts.settings
    site = ProspectSite(settings, clock=lambda: parts.clock().timestamp())
    forms = ConsoleForms(key_path(settings), settings.server.public_url)
    console = ConsolePages(site, parts.sessions, forms)
    view = ConsoleView(site, forms, console)
    admission = Admission(settings.web.visit_db_limit, settings.web.visit_wait)
    app = web.Application(
        middlewares=[
            api_problems,
            guard(
                authenticators=[bearer_authenticator(parts.api_keys), console.authenticate],
                forbidden_page=view.forbidden,
                login_url=site.url(CONSOLE_LOGIN),
            ),
            store_unavailable(site),
            visits_admitted(site, admission),
            unknown_paths(site),
        ]
    )
    app.on_response_prepare.append(name_the_server)
    app[PARTS] = parts
    app[ADMISSION] = admission
    routes = Routes(app)
    routes.public("GET", "/healthz", healthz)
    routes.public("GET", "/metrics", metrics)
    site.register(routes)
    console.register(routes)
    lookup = dns_lookup(settings)
    register_console_work(parts, view, routes, lookup)
    DownloadPages(site, parts.links, parts.blobs).register(routes)
    LetterPages(site, parts.letters, parts.links, parts.blobs).register(routes)
    api(parts, lookup).register(routes)
    return app


def dns_lookup(settings: Settings) -> DnsLookup:
    """One per web server: the console's page and the API share its remembered answers."""
    return DnsLookup.configured(settings.console.dns_checks, settings.console.dns_resolver)


def register_console_work(
    parts: WebParts, view: ConsoleView, routes: Routes, lookup: DnsLookup
) -> None:
    """The console's pages after sign-in: the timeline, actions, letters waiting, admin."""
    pages = TimelinePages(view, parts.timeline, parts.waiting)
    pages.register(routes)
    ActionPages(view, parts.timeline, pages, parts.links, parts.letters).register(routes)
    AdminPages(
        view,
        parts.users,
        parts.queue,
        parts.webhooks,
        parts.api_keys,
        parts.chain,
        parts.agent_logins,
    ).register(routes)
    ConfigPages(view, parts.settings, lookup).register(routes)
    AccountPages(
        view, view.site, parts.users, parts.sessions, parts.settings, parts.agent_logins
    ).register(routes)
    # last, after every console page: any other path under /console/
    routes.console("GET", "/console/{rest:.*}", view.unknown_page, Permission.VIEW_MESSAGES)


def api(parts: WebParts, lookup: DnsLookup | None = None) -> Api:
    """The JSON API over the parts' desks."""
    return Api(
        parts.timeline,
        parts.api_keys,
        parts.queue,
        parts.users,
        MessageActions(parts.timeline, parts.links, parts.letters),
        WebhookOperations(parts.webhooks),
        SettingsOperations(parts.settings, lookup or dns_lookup(parts.settings)),
        AgentLoginOperations(parts.agent_logins),
    )


async def start_web(parts: WebParts, *, reuse_port: bool = False) -> web.AppRunner:
    """Serve the web on `[web] listen`; `reuse_port` as for the SMTP front."""
    runner = web.AppRunner(create_app(parts), access_log=None)
    await runner.setup()
    host, _, port = parts.settings.web.listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port)
    await site.start()
    return runner
