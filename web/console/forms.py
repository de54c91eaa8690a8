"""CSRF protection for every console form, in one place.

Signed-in forms carry `csrf` = HMAC-SHA256(installation key, the session's id): it needs no
storage, changes with every sign-in, and only a page rendered for that session has it. The
sign-in form, which has no session yet, uses a signed double-submit: a random value in a
`SameSite=Strict` cookie and its HMAC in the form. Both also pass the Origin check of
web/csrf.py. `check_console_post` (installed by the console for every console POST route, so a
new form cannot forget it) and the sign-in handler call `ConsoleForms`; nothing else does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from web.csrf import FormTokens

FIELD = "csrf"
_LOOPBACK_NAMES = {"localhost"}


class CsrfRefused(Exception):
    """A console POST without a valid token or from a foreign origin; answered with 403."""


@dataclass(frozen=True)
class CookieNames:
    """The cookies' names and whether they are Secure.

    `__Host-` needs Secure, and Secure is meant for https. Chromium (156, measured) keeps
    Secure and `__Host-` cookies on http://127.0.0.1 and http://localhost, but not every
    browser does, nor do HTTP clients such as aiohttp's; so a dev relay, reached over http on
    a loopback address, leaves off the prefix and Secure with it. Anywhere else the cookies
    are `__Host-` (Secure, Path=/, no Domain: no other host or path can set or overwrite them).
    """

    session: str
    login: str
    secure: bool

    @classmethod
    def for_public_url(cls, public_url: str) -> CookieNames:
        if dev_url(public_url):
            return cls("sealrelay_session", "sealrelay_login", secure=False)
        return cls("__Host-sealrelay_session", "__Host-sealrelay_login", secure=True)


def dev_url(public_url: str) -> bool:
    """http:// on a loopback host: a relay on a developer's machine."""
    parts = urlsplit(public_url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConsoleForms:
    """Makes and checks the `csrf` field of console forms."""

    def __init__(self, key_path: Path, public_url: str) -> None:
        self._tokens = FormTokens(key_path, public_url)
        self.cookies = CookieNames.for_public_url(public_url)

    def _mac(self, purpose: str, value: str) -> str:
        message = f"console-{purpose}|{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._tokens.key, message, hashlib.sha256).hexdigest()

    def for_session(self, session_id: str) -> str:
        return self._mac("session", session_id)

    def for_login(self, nonce: str) -> str:
        return self._mac("login", nonce)

    @staticmethod
    def new_login_nonce() -> str:
        return secrets.token_urlsafe(32)

    def set_login_cookie(self, response: web.StreamResponse, nonce: str) -> None:
        response.set_cookie(
            self.cookies.login,
            nonce,
            path="/",
            secure=self.cookies.secure,
            httponly=True,
            samesite="Strict",
        )

    async def check_session_post(self, request: web.Request, session_id: str) -> None:
        """Raises CsrfRefused unless the POST comes from our origin with the session's token."""
        form = await self._form(request)
        if not _same(self.for_session(session_id), form.get(FIELD)):
            raise CsrfRefused("the form's token does not belong to this session")

    async def check_login_post(self, request: web.Request) -> None:
        """Raises CsrfRefused unless the sign-in POST matches its cookie and our origin."""
        form = await self._form(request)
        nonce = request.cookies.get(self.cookies.login)
        if not nonce or not _same(self.for_login(nonce), form.get(FIELD)):
            raise CsrfRefused("the sign-in form's token does not match its cookie")

    async def _form(self, request: web.Request) -> dict[str, str]:
        if not self._tokens.origin_allowed(request.headers.get("Origin")):
            raise CsrfRefused(f"foreign Origin {request.headers.get('Origin')!r}")
        posted = await request.post()
        return {k: v for k, v in posted.items() if isinstance(v, str)}


def _same(expected: str, presented: str | None) -> bool:
    if not presented:
        return False
    return hmac.compare_digest(expected.encode("ascii"), presented.encode("utf-8", "replace"))
