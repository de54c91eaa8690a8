"""Rules from the config: when they match, and which settings they change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from rules.domains import address_key, domain_key, domain_of
from rules.facts import MessageFacts
from rules.policy import Layer, Policy, Resolved, resolve


def _sender_pattern(pattern: str) -> str:
    """A `senders` entry as senders compare: `@domain` as domains do, an address by its key."""
    return f"@{domain_key(pattern[1:])}" if pattern.startswith("@") else address_key(pattern)


@dataclass(frozen=True)
class Match:
    """Every criterion given must hold; within one criterion any value may."""

    senders: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    recipient_domains: tuple[str, ...] = ()
    subject_prefixes: tuple[str, ...] = ()
    filenames: tuple[str, ...] = ()

    def matches(self, facts: MessageFacts, recipient: str) -> bool:
        sender = address_key(facts.sender)
        checks = (
            not self.senders
            or any(_sender_pattern(s) in (sender, f"@{domain_of(sender)}") for s in self.senders),
            not self.groups or facts.group in self.groups,
            not self.recipient_domains
            or domain_of(recipient) in {domain_key(d) for d in self.recipient_domains},
            not self.subject_prefixes
            or any(facts.subject.lower().startswith(p.lower()) for p in self.subject_prefixes),
            not self.filenames
            or any(
                fnmatchcase((part.filename or "").lower(), pattern.lower())
                for part in facts.attachments
                for pattern in self.filenames
            ),
        )
        return all(checks)


@dataclass(frozen=True)
class ConfiguredRule:
    name: str
    match: Match
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyConfig:
    defaults: Policy = field(default_factory=Policy)
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rules: Sequence[ConfiguredRule] = ()

    def __post_init__(self) -> None:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        for name, values in self.groups.items():
            Layer(f"group {name}", values)
        for rule in self.rules:
            Layer(f"rule {rule.name}", rule.settings)

    def policy_for(self, facts: MessageFacts, recipient: str) -> Resolved:
        layers = []
        if facts.group is not None and facts.group in self.groups:
            layers.append(Layer(f"group {facts.group}", self.groups[facts.group]))
        layers.extend(
            Layer(f"rule {rule.name}", rule.settings)
            for rule in self.rules
            if rule.match.matches(facts, recipient)
        )
        return resolve(self.defaults, layers)
