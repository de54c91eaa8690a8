"""Why an agent's action on a link or letter was refused: one exception type per kind of cause.

The console and the API turn each into its answer (404, 409, 422) without reading messages:
`UnknownTarget` (no such link, letter or recipient), `WrongState` (the target exists but the
action does not apply to it now) and `InvalidRequest` (the values given are wrong). Every
action checks before it writes, in the transaction it writes in, so a refusal leaves nothing.
"""

from __future__ import annotations

from gateway.texts.refusals import Refused

REASON_MAX = 500


class ActionRefused(Refused):
    """An agent's action that was not carried out; nothing was written."""


class UnknownTarget(ActionRefused):
    """No link, letter or recipient has the id given."""


class WrongState(ActionRefused):
    """The target exists, but the action does not apply to it in its present state."""


class InvalidRequest(ActionRefused):
    """The values given are not acceptable (a time in the past, an empty reason, ...)."""


def checked_actor(actor: str) -> str:
    """Who acts, as the journal names them; an action without one is refused."""
    actor = actor.strip()
    if not actor or len(actor) > 320:
        raise InvalidRequest("action.no_actor", maximum=320)
    return actor


def checked_reason(reason: str, *, required: bool) -> str:
    """A reason as given, stripped; required ones must say something, none may be too long."""
    reason = reason.strip()
    if required and not reason:
        raise InvalidRequest("action.no_reason")
    if len(reason) > REASON_MAX:
        raise InvalidRequest("action.reason_length", maximum=REASON_MAX)
    return reason
