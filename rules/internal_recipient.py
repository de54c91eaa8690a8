"""Mail to the brokerage's own domains passes untouched: colleagues need the real files."""

from __future__ import annotations

from rules.actions import Action, KeepOriginal
from rules.domains import domain_key, domain_of
from rules.facts import MessageFacts
from rules.policy import Policy

name = "internal-recipient"


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    if domain_of(recipient) in {domain_key(d) for d in policy.internal_domains}:
        return KeepOriginal("internal recipient")
    return None
