"""An agent's own upstream login through the API: admins read it, managers set and clear it.

The password goes in (PUT) and never comes out: every answer holds the URL, the username and
when it was set, nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.access import Permission
from gateway.agent_logins import AgentLogins, LoginKeyMissing, LoginView
from gateway.users import UnknownUser, UserError, normalize_address
from web.api.declare import Call, NoBody, NoQuery, Operation
from web.problem_details import ProblemResponse

_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"


class UpstreamLoginSet(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(
        max_length=300,
        pattern=rf"^smtps?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::{_PORT})?/?$",
        description="smtp://HOST[:PORT] (STARTTLS) or smtps://HOST[:PORT]; no login in it.",
    )
    username: str = Field(min_length=1, max_length=320, pattern=r"^\S+$")
    password: str = Field(
        min_length=1,
        max_length=1000,
        description="Stored sealed; never shown again.",
        json_schema_extra={"writeOnly": True},
    )


class UpstreamLoginOut(BaseModel):
    """Where the user's mail leaves through; never the password."""

    email: str
    url: str
    username: str
    created_at: datetime
    updated_at: datetime


def _out(view: LoginView) -> UpstreamLoginOut:
    return UpstreamLoginOut(
        email=view.email,
        url=view.url,
        username=view.username,
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except UnknownUser as exc:
        raise ProblemResponse.refused(404, exc) from exc
    except UserError as exc:
        raise ProblemResponse.refused(422, exc) from exc
    except LoginKeyMissing as exc:
        # the operator's problem, not the caller's: the file's path stays in the log
        raise ProblemResponse(
            503, "The key that seals upstream logins is missing; ask the operator."
        ) from exc


def _user_in_path(call: Call[Any, Any]) -> str:
    """The user's address from the path; one that is no address names no user: 404."""
    try:
        return normalize_address(call.path["email"])
    except UserError as exc:
        raise ProblemResponse.refused(404, exc) from exc


@dataclass(frozen=True)
class AgentLoginOperations:
    logins: AgentLogins

    async def get_upstream_login(self, call: Call[NoQuery, NoBody]) -> UpstreamLoginOut:
        with _refusals():
            view = await self.logins.show(_user_in_path(call))
        if view is None:
            raise ProblemResponse(404, "This user has no upstream login.")
        return _out(view)

    async def set_upstream_login(self, call: Call[NoQuery, UpstreamLoginSet]) -> UpstreamLoginOut:
        b, email = call.body, _user_in_path(call)
        with _refusals():
            await self.logins.set(email, b.url, b.username, b.password, by=call.principal.name)
            view = await self.logins.show(email)
        assert view is not None
        return _out(view)

    async def clear_upstream_login(self, call: Call[NoQuery, NoBody]) -> None:
        with _refusals():
            cleared = await self.logins.clear(_user_in_path(call), by=call.principal.name)
        if not cleared:
            raise ProblemResponse(404, "This user has no upstream login.")

    def operations(self, prefix: str) -> list[Operation[Any, Any]]:
        admin, manage = Permission.VIEW_ADMIN, Permission.MANAGE
        path = f"{prefix}/users/{{email}}/upstream-login"
        return [
            Operation("GET", path, admin,
                      "A user's own upstream login: URL, username, when set (never the password)",
                      self.get_upstream_login, NoQuery, NoBody, UpstreamLoginOut, errors=(404,)),
            Operation("PUT", path, manage,
                      "Send a user's mail through their own login at their mail host",
                      self.set_upstream_login, NoQuery, UpstreamLoginSet, UpstreamLoginOut,
                      errors=(404, 422, 503)),
            Operation("DELETE", path, manage,
                      "Remove a user's own upstream login: their mail leaves the default way",
                      self.clear_upstream_login, NoQuery, NoBody, None, errors=(404,)),
        ]  # fmt: skip
