"""The languages sealrelay ships, the one rule for a language it does not ship, and the
language a recipient is addressed in.

This is the one list: every text kind (page catalogs, mail wordings, templates, letter block
sets) must have a file for each language here, and check-config and serve refuse to start
when one is missing or lacks a key another language has (gateway.texts.catalog.text_problems). It
lives in rules/ because rules must choose a recipient's language without importing the
gateway, and the gateway, the web pages and the settings all import it from here.

The one fallback (`shipped_language`): a tag's primary subtag when we ship it; otherwise the
configured default language (`[policy] language`, German unless set, as the product is made
for German brokerages) wherever the caller has the settings at hand, which every page and
every mail in the running relay has; otherwise English, the language a reader of a language
we do not ship most likely reads. The last step only serves renderers handed a stored record
on their own (a consent PDF of a record in "fr"); the tests of those renderers expect it.

The recipient's language: the agent's explicit choice, then the message's own
Content-Language, then the group's or the default. An explicit choice we do not ship
(`X-Sealrelay-Language: fr`) is a mistake the agent should hear of: it falls back to the
configured default, not to whatever the mail client wrote in Content-Language, and
`unsupported_request` tells the gateway to journal a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rules.facts import MessageFacts

SHIPPED_LANGUAGES = ("de", "en", "es")
HOME_LANGUAGE = "de"  # the default of `[policy] language`
LAST_RESORT_LANGUAGE = "en"
LANGUAGE_HEADER = "x-sealrelay-language"
LANGUAGE_HEADER_NAME = "X-Sealrelay-Language"


def shipped_language(tag: str, default: str | None = None) -> str:
    """`tag`'s language when we ship it, else `default` (the configured one), else English."""
    primary = primary_subtag(tag)
    if primary in SHIPPED_LANGUAGES:
        return primary
    if default in SHIPPED_LANGUAGES:
        return default
    return LAST_RESORT_LANGUAGE


def language_of(facts: MessageFacts, default: str) -> str:
    """The recipient's language; `default` is the policy's (`Policy.language`)."""
    requested = _requested(facts)
    if requested:
        return shipped_language(requested, default)
    return shipped_language(facts.header("content-language") or "", default)


def unsupported_request(facts: MessageFacts) -> str | None:
    """The agent's explicit language when it is one we do not ship, as written."""
    requested = _requested(facts)
    if requested and primary_subtag(requested) not in SHIPPED_LANGUAGES:
        return requested
    return None


def _requested(facts: MessageFacts) -> str:
    return (facts.header(LANGUAGE_HEADER) or "").strip()


def primary_subtag(tag: str) -> str:
    """`de-DE`, `es_ES`, `en, de` -> `de`, `es`, `en`."""
    return tag.split(",")[0].strip().split("-")[0].split("_")[0].lower()
