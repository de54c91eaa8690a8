"""Which upstream a copy leaves through: the `[[routes]]` table (docs/routes.md).

Routes are checked in file order and the first whose conditions all hold wins; a copy no
route takes goes to `[upstream]`, the route named "default". The table is opened once per
relay, one upstream object per named upstream, and asked at every attempt: a queued copy
follows the settings the relay runs with now, not those it was queued under.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.config import DEFAULT_ROUTE, MxSettings, RouteSettings, Settings, UpstreamSettings
from gateway.outbound.mx import MxUpstream
from gateway.outbound.upstream import CaptureUpstream, SmtpUpstream, Upstream, relay_name
from rules.domains import domain_key


class Routed(Protocol):
    """What a route looks at in a message (a gateway.store.models.Message)."""

    @property
    def sender(self) -> str: ...

    @property
    def trusted_entry(self) -> str | None: ...


@dataclass(frozen=True)
class Route:
    """The route a copy takes: its name, the upstream's name, and the upstream itself."""

    name: str
    upstream_name: str
    upstream: Upstream
    relay: str  # where the upstream is, as the log's relay= names it


@dataclass(frozen=True)
class _Entry:
    name: str
    upstream: str
    sender_domains: frozenset[str]
    recipient_domains: frozenset[str]
    trusted: frozenset[str]  # names of [[smtp.trusted]] entries

    def takes(self, message: Routed, recipient: str) -> bool:
        return (
            (not self.sender_domains or domain_of(message.sender) in self.sender_domains)
            and (not self.recipient_domains or domain_of(recipient) in self.recipient_domains)
            and (not self.trusted or message.trusted_entry in self.trusted)
        )


class RouteTable:
    def __init__(
        self,
        routes: Sequence[RouteSettings],
        upstreams: Mapping[str, tuple[Upstream, str]],
    ) -> None:
        """`upstreams`: each upstream by name with its relay= name; "default" is required."""
        self._routes = {
            name: Route(name, name, upstream, relay)
            for name, (upstream, relay) in upstreams.items()
        }
        self._entries = [
            _Entry(
                r.name,
                r.upstream,
                frozenset(r.sender_domains),
                frozenset(r.recipient_domains),
                frozenset(r.trusted),
            )
            for r in routes
        ]
        self.default = self._routes[DEFAULT_ROUTE]

    @classmethod
    def open(cls, settings: Settings, default: Upstream | None = None) -> RouteTable:
        """The relay's table: one upstream per `[upstream]`/`[upstreams.*]` table.

        `default`: an upstream to use instead of `[upstream]`'s (a test's)."""
        named: dict[str, UpstreamSettings] = {
            DEFAULT_ROUTE: settings.upstream,
            **settings.upstreams,
        }
        hostname = settings.server.hostname
        upstreams = {
            name: (
                default
                if default is not None and name == DEFAULT_ROUTE
                else open_upstream(upstream, hostname, settings.mx),
                relay_name(upstream.url),
            )
            for name, upstream in named.items()
        }
        return cls(settings.routes, upstreams)

    async def close(self) -> None:
        """Close every upstream once (QUIT on their kept connections), at shutdown."""
        upstreams = {id(route.upstream): route.upstream for route in self._routes.values()}
        await asyncio.gather(*(upstream.close() for upstream in upstreams.values()))

    def route_for(self, message: Routed, recipient: str) -> Route:
        """The first route that takes this copy, else the default."""
        for entry in self._entries:
            if entry.takes(message, recipient):
                upstream = self._routes[entry.upstream]
                return Route(entry.name, upstream.name, upstream.upstream, upstream.relay)
        return self.default


def domain_of(address: str) -> str | None:
    """The domain part, lower-cased; None for the null sender."""
    local, at, domain = address.rpartition("@")
    return domain_key(domain) if at and local and domain else None


def describe_routes(settings: Settings) -> list[str]:
    """The table as `check-config` lists it: one line per route, then the fallback."""
    relays = {
        DEFAULT_ROUTE: settings.upstream.url,
        **{n: u.url for n, u in settings.upstreams.items()},
    }
    lines = []
    for route in settings.routes:
        conditions = [
            f"{key} {', '.join(values)}"
            for key, values in (
                ("sender domain", route.sender_domains),
                ("recipient domain", route.recipient_domains),
                ("trusted", route.trusted),
            )
            if values
        ]
        lines.append(
            f"route {route.name}: {' and '.join(conditions)}"
            f" -> {route.upstream} ({relay_name(relays[route.upstream])})"
        )
    lines.append(f"otherwise -> {DEFAULT_ROUTE} ({relay_name(settings.upstream.url)})")
    return lines


def open_upstream(
    settings: UpstreamSettings, local_hostname: str, mx: MxSettings | None = None
) -> Upstream:
    """The transport for `settings.url`; `mx` ([mx]) is read by direct delivery only."""
    if settings.url.startswith("capture:"):
        return CaptureUpstream(Path(settings.url.removeprefix("capture:")))
    if settings.url == "mx:":
        return MxUpstream(settings, mx or MxSettings(), local_hostname)
    return SmtpUpstream(settings, local_hostname)
