"""S/MIME or PGP/MIME mail keeps its body: changing a part would break the agent's signature."""

from __future__ import annotations

from rules.actions import Action, KeepOriginal
from rules.facts import MessageFacts
from rules.policy import Policy

name = "signed-message"


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    if facts.signed:
        return KeepOriginal("signed or encrypted: attachments stay so the signature holds")
    return None
