"""The one flow of every page a token opens: the download link's (/d/) and the letter's (/l/).

A token is in one of four states. Found: the desk returns what the page shows. Unknown
(`TokenUnknown`): 404 in the browser's language, never revealing whether it once existed,
counted against the client's address by the site's bad-token limiter. Expired or revoked
(`TokenClosed`, its `reason` says which): the family's own closed page, 410; a revoked
token's says "access ended" (ProspectSite.access_ended) and never offers a new link.

Lookups raise the page instead of returning it (`RaisedPage`, an aiohttp HTTP exception
that is the rendered page), so a handler reads top to bottom: the lookup's value is always
the found state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aiohttp import web

from gateway.links.tokens import TokenClosed, TokenUnknown
from web.pages import ProspectSite
from web.raised_page import RaisedPage

T = TypeVar("T")
C = TypeVar("C", bound=TokenClosed)


class TokenFamily(Generic[C]):
    """One kind of token page: which closed state its desk raises, the page that answers it,
    and whether a closed token counts against the client's address as an unknown one does."""

    def __init__(
        self,
        site: ProspectSite,
        closed: type[C],
        closed_page: Callable[[web.Request, C], Awaitable[web.Response]],
        *,
        count_closed: bool,
    ) -> None:
        self.site = site
        self.closed = closed
        self.closed_page = closed_page
        self.count_closed = count_closed

    async def open(self, request: web.Request, lookup: Awaitable[T]) -> T:
        """The found state, or the unknown or closed page raised."""
        try:
            return await lookup
        except TokenUnknown:
            raise RaisedPage(self.site.unknown_token(request)) from None
        except self.closed as closed:
            if self.count_closed:
                self.site.limiter.record(self.site.visitor(request).ip)
            raise RaisedPage(await self.closed_page(request, closed)) from None
