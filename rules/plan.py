"""plan(facts) -> what each recipient gets. Pure: no I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rules.actions import Action, KeepOriginal
from rules.facts import MessageFacts


@dataclass(frozen=True)
class Plan:
    per_recipient: Mapping[str, tuple[Action, ...]]


def plan(facts: MessageFacts) -> Plan:
    return Plan({recipient: (KeepOriginal(),) for recipient in facts.recipients})
