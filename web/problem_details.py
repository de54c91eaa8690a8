"""Errors of the JSON API as RFC 9457 problem details (`application/problem+json`).

Raised as aiohttp HTTP exceptions, so a handler reads top to bottom and the guard, the
handlers and the validation all answer in the same shape.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.texts.refusals import Refused

MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class ProblemResponse(web.HTTPException):
    """A problem detail, raised; aiohttp answers with it as it is."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.status_code = status
        body: dict[str, Any] = {
            "type": type_,
            "title": _TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
            **extensions,
        }
        super().__init__(
            headers=headers, text=json.dumps(body, ensure_ascii=False), content_type=MEDIA_TYPE
        )

    @classmethod
    def refused(cls, status: int, refusal: Refused) -> ProblemResponse:
        """A desk's refusal: its English text, and its key as `code` for a program to branch
        on (the text may be reworded; the code stays)."""
        return cls(status, str(refusal), code=refusal.key)
