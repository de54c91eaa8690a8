"""The effective policy of each group, for the admins' settings page: every value and the layer
it came from.

Built from the same `PolicyConfig` the pipeline resolves per message (rules/matching.py), with
the same `resolve`, so the page cannot drift from what the relay does. Rules apply per
message, when their match holds; here they are listed apart, and each value names the rules
that may change it for the group's messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rules.matching import ConfiguredRule, Match, PolicyConfig
from rules.policy import Layer, Policy, resolve

# the label of the layer below every group and rule (rules.policy.Resolved.source)
DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class EffectiveValue:
    name: str
    value: Any
    source: str  # "default", "group sales"
    rules: tuple[str, ...]  # names of the rules that may change it for this group's messages


@dataclass(frozen=True)
class GroupPolicy:
    group: str | None  # None: senders without a group
    values: tuple[EffectiveValue, ...]


@dataclass(frozen=True)
class RuleSummary:
    name: str
    match: Match
    changes: tuple[tuple[str, Any], ...]  # (setting, value) in the Policy's field order


@dataclass(frozen=True)
class PolicyOverview:
    groups: tuple[GroupPolicy, ...]
    rules: tuple[RuleSummary, ...]


FIELD_ORDER = tuple(f.name for f in dataclasses.fields(Policy))


def policy_overview(config: PolicyConfig) -> PolicyOverview:
    """Senders without a group first, then each configured group in the settings' order."""
    groups = [None, *config.groups]
    return PolicyOverview(
        groups=tuple(_group(config, group) for group in groups),
        rules=tuple(_rule(rule) for rule in config.rules),
    )


def _group(config: PolicyConfig, group: str | None) -> GroupPolicy:
    layers = [] if group is None else [Layer(f"group {group}", config.groups[group])]
    resolved = resolve(config.defaults, layers)
    may_apply = [rule for rule in config.rules if _may_apply(rule.match, group)]
    return GroupPolicy(
        group,
        tuple(
            EffectiveValue(
                name,
                getattr(resolved.policy, name),
                resolved.source(name),
                tuple(rule.name for rule in may_apply if name in rule.settings),
            )
            for name in FIELD_ORDER
        ),
    )


def _may_apply(match: Match, group: str | None) -> bool:
    """Whether a rule can match some message of this group's senders (its other criteria
    depend on the message)."""
    return not match.groups or group in match.groups


def _rule(rule: ConfiguredRule) -> RuleSummary:
    return RuleSummary(
        rule.name,
        rule.match,
        tuple((name, rule.settings[name]) for name in FIELD_ORDER if name in rule.settings),
    )
