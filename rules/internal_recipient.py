"""Mail to the brokerage's own domains passes untouched: colleagues need the real files."""

from __future__ import annotations

from rules.actions import Action, KeepOriginal
from rules.facts import MessageFacts
from rules.policy import Policy

name = "internal-recipient"


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    domain = recipient.rpartition("@")[2].lower()
    if domain in {d.lower() for d in policy.internal_domains}:
        return KeepOriginal("internal recipient")
    return None
