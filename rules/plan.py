"""plan(facts, config) -> what each recipient gets. Pure: no I/O, no clock, no globals.

The chain is declared as a tuple of rule modules; the first that decides wins, and a
recipient no rule decides for gets the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from rules import (
    internal_recipient,
    large_attachments,
    registered_letter,
    signed_message,
    winmail,
)
from rules.actions import Action, KeepOriginal
from rules.facts import MessageFacts
from rules.matching import PolicyConfig

CHAIN: tuple[ModuleType, ...] = (
    internal_recipient,
    registered_letter,
    signed_message,
    large_attachments,
    winmail,
)


def check_chain(chain: tuple[ModuleType, ...] = CHAIN) -> None:
    names = [rule.name for rule in chain]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate rule names in the chain: {names}")


check_chain()


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str


@dataclass(frozen=True)
class Plan:
    per_recipient: Mapping[str, Decision]


def plan_for_recipient(facts: MessageFacts, recipient: str, config: PolicyConfig) -> Decision:
    policy = config.policy_for(facts, recipient).policy
    for rule in CHAIN:
        action: Action | None = rule.decide(facts, recipient, policy)
        if action is not None:
            return Decision(action, rule.name)
    return Decision(KeepOriginal(), "default")


DEFAULTS = PolicyConfig()


def plan(facts: MessageFacts, config: PolicyConfig = DEFAULTS) -> Plan:
    return Plan({r: plan_for_recipient(facts, r, config) for r in facts.recipients})
