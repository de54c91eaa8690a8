"""The web server: health, metrics and the prospect's pages (downloads, registered letters);
console and API later."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from gateway.metrics import QUEUE_DEPTH
from gateway.models import Delivery, DeliveryStatus
from gateway.relay import Relay
from web.downloads import DownloadPages
from web.letters import LetterPages
from web.pages import ProspectSite

RELAY = web.AppKey("relay", Relay)
log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """Ready when the database answers; load balancers and orchestrators poll this."""
    relay = request.app[RELAY]
    try:
        async with relay.db.transaction() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:
        # The exception names hosts, ports and SQL; the public may only learn that it failed.
        log.warning("healthz: database unavailable: %s", exc)
        return web.json_response({"status": "error", "database": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "roles": sorted(relay.roles)})


async def metrics(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    async with relay.db.transaction() as session:
        rows = await session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        )
        counts = {status: count for status, count in rows}
    for status in DeliveryStatus:
        QUEUE_DEPTH.labels(status=status.value).set(counts.get(status.value, 0))
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(relay: Relay) -> web.Application:
    app = web.Application()
    app[RELAY] = relay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    site = ProspectSite(relay.settings, clock=lambda: relay.clock().timestamp())
    site.register(app)
    DownloadPages(site, relay.links, relay.blobs).register(app)
    LetterPages(relay, site).register(app)
    return app


async def start_web(relay: Relay) -> web.AppRunner:
    runner = web.AppRunner(create_app(relay), access_log=None)
    await runner.setup()
    host, _, port = relay.settings.web.listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    return runner
