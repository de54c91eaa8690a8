"""Under /api/ every error is problem details, aiohttp's own 404, 405 and 500 included."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute

from web.guard import Handler
from web.problem_details import MEDIA_TYPE, ProblemResponse

log = logging.getLogger(__name__)
API_PREFIX = "/api/"
OPENAPI_PATH = "/api/v1/openapi.json"
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
        raise ProblemResponse(exc.status, _detail(request, exc), headers=headers) from exc
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        raise ProblemResponse(500, "The server met an error; it is logged.") from exc


def _detail(request: web.Request, exc: web.HTTPException) -> str:
    """What an integrator needs when no route matched: where the paths are, or which
    methods this one takes (aiohttp says only "Not Found" and "Method Not Allowed")."""
    if not isinstance(request.match_info.route, SystemRoute):
        return exc.reason
    if exc.status == 404:
        return f"No such path in the API; its paths are listed in {OPENAPI_PATH}."
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "").replace(",", ", ")
        return f"{request.method} is not allowed on this path; it takes {allowed}."
    return exc.reason
