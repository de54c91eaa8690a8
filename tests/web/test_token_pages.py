"""The token pages' shared flow on its own: found, unknown, expired or revoked, raised."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.links.tokens import Closed, TokenClosed, TokenUnknown
from tests.conftest import relay_settings
from tests.support import free_port
from web.pages import ProspectSite
from web.raised_page import RaisedPage
from web.token_pages import TokenFamily


class Shut(TokenClosed):
    pass


async def closed_page(request: web.Request, closed: Shut) -> web.Response:
    return web.Response(
        text=f"closed: {closed.reason}",
        status=410,
        content_type="text/html",
        charset="utf-8",
        headers={"X-Why": str(closed.reason)},
    )


def family(tmp_path: Path, *, count_closed: bool) -> TokenFamily[Shut]:
    site = ProspectSite(relay_settings(tmp_path, free_port()))
    return TokenFamily(site, Shut, closed_page, count_closed=count_closed)


def request() -> web.Request:
    return make_mocked_request("GET", "/d/token", headers={"Accept-Language": "en"})


async def raising(error: Exception) -> str:
    raise error


async def found() -> str:
    return "the link"


async def test_found_is_returned(tmp_path: Path) -> None:
    assert await family(tmp_path, count_closed=True).open(request(), found()) == "the link"


async def test_unknown_raises_the_404_page_and_counts(tmp_path: Path) -> None:
    tokens = family(tmp_path, count_closed=False)
    with pytest.raises(RaisedPage) as raised:
        await tokens.open(request(), raising(TokenUnknown("t")))
    assert raised.value.status == 404
    assert raised.value.content_type == "text/html"
    assert raised.value.charset == "utf-8"
    assert raised.value.text is not None and "<html" in raised.value.text
    assert len(tokens.site.limiter) == 1


@pytest.mark.parametrize("reason", list(Closed))
@pytest.mark.parametrize("count_closed", [True, False])
async def test_expired_and_revoked_raise_the_family_page(
    tmp_path: Path, reason: Closed, count_closed: bool
) -> None:
    tokens = family(tmp_path, count_closed=count_closed)
    with pytest.raises(RaisedPage) as raised:
        await tokens.open(request(), raising(Shut(reason)))
    page = raised.value
    assert (page.status, page.text, page.headers["X-Why"]) == (410, f"closed: {reason}", reason)
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert len(tokens.site.limiter) == (1 if count_closed else 0)


async def test_another_family_s_closed_token_is_not_caught(tmp_path: Path) -> None:
    with pytest.raises(TokenClosed):
        await family(tmp_path, count_closed=True).open(
            request(), raising(TokenClosed(Closed.EXPIRED))
        )
