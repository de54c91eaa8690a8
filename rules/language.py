"""The language a recipient is addressed in: the agent's explicit choice, then the message's
own Content-Language, then the group's or the default."""

from __future__ import annotations

from rules.facts import MessageFacts
from rules.policy import Policy

LANGUAGE_HEADER = "x-sealrelay-language"


def language_of(facts: MessageFacts, policy: Policy) -> str:
    for header in (LANGUAGE_HEADER, "content-language"):
        value = facts.header(header)
        if value:
            primary = value.split(",")[0].strip().split("-")[0].split("_")[0].lower()
            if primary in policy.languages:
                return primary
    return policy.language
