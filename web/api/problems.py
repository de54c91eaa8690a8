"""Under /api/ every error is problem details, aiohttp's own 404, 405 and 500 included."""

from __future__ import annotations

import logging

from aiohttp import web

from web.guard import Handler
from web.problem_details import MEDIA_TYPE, ProblemResponse

log = logging.getLogger(__name__)
API_PREFIX = "/api/"
_KEPT_HEADERS = ("allow", "retry-after")


@web.middleware
async def api_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == MEDIA_TYPE or exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in _KEPT_HEADERS}
        raise ProblemResponse(exc.status, exc.reason, headers=headers) from exc
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        raise ProblemResponse(500, "The server met an error; it is logged.") from exc
