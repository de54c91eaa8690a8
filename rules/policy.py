"""Settings that steer policy, and where each effective value came from.

Values resolve in layers: the defaults, then the sender's group, then every matching rule in
order. Pure data and a pure lookup, so the console can show the origin of every value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rules.language import HOME_LANGUAGE

MiB = 1024 * 1024


@dataclass(frozen=True)
class Policy:
    link_attachments_over: int = 2 * MiB
    link_total_over: int = 10 * MiB
    keep_attached: frozenset[str] = frozenset({"text/calendar", "text/vcard", "text/x-vcard"})
    # MIME types ("video/*") or file names ("*.mp4") linked whatever their size.
    always_link: frozenset[str] = frozenset()
    download_link_days: int = 90
    internal_domains: frozenset[str] = frozenset()
    language: str = HOME_LANGUAGE
    letter_tags: tuple[str, ...] = ("[Exposé]", "[S-Exposé]", "[Offer]")
    registered_letter: bool = False
    letter_link_days: int = 14
    letter_block_set: str = "default"
    unpack_winmail: bool = True


POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(Policy))


@dataclass(frozen=True)
class Layer:
    """One source of overrides: `group sales`, `rule videos`."""

    source: str
    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        unknown = set(self.values) - POLICY_FIELDS
        if unknown:
            raise ValueError(f"{self.source}: unknown settings {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Resolved:
    policy: Policy
    sources: Mapping[str, str] = field(default_factory=dict)

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")


def resolve(defaults: Policy, layers: Sequence[Layer]) -> Resolved:
    policy, sources = defaults, {}
    for layer in layers:
        policy = dataclasses.replace(policy, **layer.values)
        sources.update(dict.fromkeys(layer.values, layer.source))
    return Resolved(policy, sources)
