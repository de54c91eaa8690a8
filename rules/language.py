"""The language a recipient is addressed in: the agent's explicit choice, then the message's
own Content-Language, then the group's or the default.

An explicit choice we do not ship (`X-Sealrelay-Language: fr`) is a mistake the agent should
hear of: it falls back to the configured default, not to whatever the mail client wrote in
Content-Language, and `unsupported_request` tells the gateway to journal a warning.
"""

from __future__ import annotations

from rules.facts import MessageFacts
from rules.policy import Policy

LANGUAGE_HEADER = "x-sealrelay-language"
LANGUAGE_HEADER_NAME = "X-Sealrelay-Language"


def language_of(facts: MessageFacts, policy: Policy) -> str:
    requested = _requested(facts)
    if requested:
        primary = _primary(requested)
        return primary if primary in policy.languages else policy.language
    content_language = _primary(facts.header("content-language") or "")
    return content_language if content_language in policy.languages else policy.language


def unsupported_request(facts: MessageFacts, policy: Policy) -> str | None:
    """The agent's explicit language when it is one we do not ship, as written."""
    requested = _requested(facts)
    if requested and _primary(requested) not in policy.languages:
        return requested
    return None


def _requested(facts: MessageFacts) -> str:
    return (facts.header(LANGUAGE_HEADER) or "").strip()


def _primary(value: str) -> str:
    """`de-DE`, `es_ES`, `en, de` -> `de`, `es`, `en`."""
    return value.split(",")[0].strip().split("-")[0].split("_")[0].lower()
