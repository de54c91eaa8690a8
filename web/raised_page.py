"""A rendered page raised as an aiohttp HTTP exception, so a lookup or a check can end the
request with the page it deserves and the handler reads top to bottom (Starlette's way)."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict


class RaisedPage(web.HTTPException):
    """A rendered page (status, headers, HTML), raised; aiohttp answers with it as it is."""

    def __init__(self, page: web.Response) -> None:
        self.status_code = page.status
        headers = CIMultiDict(page.headers)
        headers.popall("Content-Type", None)
        super().__init__(headers=headers, text=page.text, content_type=page.content_type)
