"""The console's form for an agent's own upstream login, shared by My account and the admin's
users page: read the posted fields, set or clear, and say what went wrong in the reader's
language. The password field is never filled in by a page; the password is never logged."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from gateway.agent_logins import MAX_PASSWORD, AgentLogins, LoginKeyMissing
from gateway.texts.catalog import Catalog
from gateway.users import UnknownUser, UserError
from web.console.view import form_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoginRefused(Exception):
    """Why the form did nothing, for the page; `status` for the response; `typed`: the server
    and username as typed, shown again so that one slip is not typed twice (never the
    password)."""

    message: str
    status: int
    typed: Mapping[str, str] = field(default_factory=dict)


async def apply_login_form(
    logins: AgentLogins, email: str, posted: Mapping[str, object], catalog: Catalog, *, by: str
) -> str:
    """Set or clear `email`'s login from the posted form; the notice key for what was done.
    LoginRefused when nothing was done. The password is taken as typed (spaces count)."""
    action = form_text(posted.get("action"))
    url, username = form_text(posted.get("url")), form_text(posted.get("username"))
    typed = {"url": _without_password(url), "username": username} if action == "set" else {}

    def refused(key: str, status: int, **params: str) -> LoginRefused:
        return LoginRefused(catalog.t(key, **params), status, typed)

    try:
        if action == "clear":
            await logins.clear(email, by=by)
            return "login_cleared"
        if action != "set":
            raise refused("upstream_login.error.form", 400)
        raw = posted.get("password")
        password = raw if isinstance(raw, str) else ""
        if not url or not username or not password:
            raise refused("upstream_login.error.missing", 400)
        if len(password) > MAX_PASSWORD:
            raise refused("upstream_login.error.form", 400)
        await logins.set(email, url, username, password, by=by)
        return "login_saved"
    except LoginKeyMissing as exc:
        log.error("console: an upstream login cannot be changed: %s", exc)
        raise refused("upstream_login.error.key", 503) from exc
    except UnknownUser as exc:
        raise refused("upstream_login.error.refused", 404, detail=exc.said(catalog)) from exc
    except UserError as exc:  # the reason names the field, never the password
        raise refused("upstream_login.error.refused", 400, detail=exc.said(catalog)) from exc


def _without_password(url: str) -> str:
    """The URL shown again without a username and password typed into it (refused there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
