"""Who calls the API: an `Authorization: Bearer <key>` header, checked by the key desk.

No header, or a scheme other than Bearer: not ours, so other authenticators may try. A
Bearer key that is unknown or revoked: 401 at once, never a fall-through to another way in.
Keys count only on API routes; the console has its own sessions.
"""

from __future__ import annotations

from aiohttp import web

from gateway.access import Principal
from gateway.console.api_keys import ApiKeyDesk
from web.guard import Audience, Authenticator, rule_of
from web.problem_details import ProblemResponse


def bearer_authenticator(keys: ApiKeyDesk) -> Authenticator:
    async def authenticate(request: web.Request) -> Principal | None:
        rule = rule_of(request)
        if rule is None or rule.audience is not Audience.API:
            return None
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = await keys.authenticate(key.strip())
        if found is None:
            raise ProblemResponse(
                401,
                "The API key is unknown or revoked.",
                headers={"WWW-Authenticate": 'Bearer realm="sealrelay", error="invalid_token"'},
            )
        return Principal.for_api_key(found.id, found.name, found.scope)

    return authenticate
