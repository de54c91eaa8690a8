"""What the settings make of things, through the API, read-only (VIEW_ADMIN): the effective
policy per group, the consent texts per block set and language, and the DKIM records with
what DNS shows. The same answers as the console's admin pages (web/console/admin_config.py),
as data: sizes in bytes, days as numbers, sets as sorted lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from gateway.access import Permission
from gateway.config import Settings
from gateway.console.dkim_records import DnsState, check_records, dkim_records
from gateway.console.effective_policy import PolicyOverview, policy_overview
from gateway.console.letter_texts import BlockSetTexts, Origin, ShownText, letter_texts
from gateway.dns_lookup import DnsLookup
from gateway.letters.blocks import BlockSets
from web.api.declare import Call, NoBody, NoQuery, Operation

PolicyValue = int | bool | str | list[str]


class PolicyValueOut(BaseModel):
    name: str = Field(description="The setting's key, as in [policy], a group or a rule.")
    value: PolicyValue = Field(description="Sizes in bytes, days as numbers, sets sorted.")
    source: str = Field(description='"default", or "group NAME".')
    rules: list[str] = Field(description="Rules that may change it for this group's messages.")


class GroupPolicyOut(BaseModel):
    group: str | None = Field(description="null: senders without a group.")
    values: list[PolicyValueOut]


class RuleMatchOut(BaseModel):
    senders: list[str]
    groups: list[str]
    recipient_domains: list[str]
    subject_prefixes: list[str]
    filenames: list[str]


class RuleOut(BaseModel):
    name: str
    match: RuleMatchOut = Field(description="Every criterion given must hold; empty: any.")
    sets: dict[str, PolicyValue]


class EffectivePolicy(BaseModel):
    """Per group, every policy value and its source; the rules in the order they apply."""

    groups: list[GroupPolicyOut]
    rules: list[RuleOut]


class PlaceholderOut(BaseModel):
    name: str
    origin: Origin
    setting: str | None = Field(description="Where a broker sets the value, if a setting.")


class TextOut(BaseModel):
    place: str
    text: str = Field(description="As prospects read it; per-letter placeholders kept.")
    placeholders: list[PlaceholderOut]


class BlockOut(BaseModel):
    id: str
    required: bool
    texts: list[TextOut]


class BlockSetOut(BaseModel):
    name: str
    language: str
    texts_sha256: str = Field(description="What each consent with this set records.")
    letter: list[TextOut]
    blocks: list[BlockOut]


class LetterTexts(BaseModel):
    """Every block set in use, in every language."""

    items: list[BlockSetOut]


class DkimRecordOut(BaseModel):
    domain: str
    selector: str
    name: str = Field(description="The TXT record's name: SELECTOR._domainkey.DOMAIN.")
    value: str | None = Field(description="The TXT value to publish; null: key unreadable.")
    strings: list[str] = Field(description="The value in strings of at most 255 characters.")
    problem: str | None
    dns: DnsState
    published: list[str] = Field(description="DKIM records DNS shows at the name.")


class DkimRecords(BaseModel):
    """Each configured DKIM key's record and whether DNS shows it."""

    items: list[DkimRecordOut]


def policy_value(value: Any) -> PolicyValue:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    assert isinstance(value, int | bool | str), value
    return value


def _policy(overview: PolicyOverview) -> EffectivePolicy:
    return EffectivePolicy(
        groups=[
            GroupPolicyOut(
                group=g.group,
                values=[
                    PolicyValueOut(
                        name=v.name,
                        value=policy_value(v.value),
                        source=v.source,
                        rules=list(v.rules),
                    )
                    for v in g.values
                ],
            )
            for g in overview.groups
        ],
        rules=[
            RuleOut(
                name=r.name,
                match=RuleMatchOut(
                    senders=list(r.match.senders),
                    groups=list(r.match.groups),
                    recipient_domains=list(r.match.recipient_domains),
                    subject_prefixes=list(r.match.subject_prefixes),
                    filenames=list(r.match.filenames),
                ),
                sets={name: policy_value(value) for name, value in r.changes},
            )
            for r in overview.rules
        ],
    )


def _text(text: ShownText) -> TextOut:
    return TextOut(
        place=text.place,
        text=text.text,
        placeholders=[
            PlaceholderOut(name=p.name, origin=p.origin, setting=p.setting)
            for p in text.placeholders
        ],
    )


def _set(s: BlockSetTexts) -> BlockSetOut:
    return BlockSetOut(
        name=s.name,
        language=s.language,
        texts_sha256=s.texts_sha256,
        letter=[_text(t) for t in s.letter],
        blocks=[
            BlockOut(id=b.id, required=b.required, texts=[_text(t) for t in b.texts])
            for b in s.blocks
        ],
    )


@dataclass
class SettingsOperations:
    settings: Settings
    lookup: DnsLookup

    def __post_init__(self) -> None:
        self._policy = _policy(policy_overview(self.settings.policy_config()))
        self._texts = LetterTexts(items=[_set(s) for s in letter_texts(BlockSets(self.settings))])

    async def effective_policy(self, call: Call[NoQuery, NoBody]) -> EffectivePolicy:
        return self._policy

    async def consent_texts(self, call: Call[NoQuery, NoBody]) -> LetterTexts:
        return self._texts

    async def dkim_records(self, call: Call[NoQuery, NoBody]) -> DkimRecords:
        checked = await check_records(dkim_records(self.settings), self.lookup)
        return DkimRecords(
            items=[
                DkimRecordOut(
                    domain=c.record.domain,
                    selector=c.record.selector,
                    name=c.record.name,
                    value=c.record.value,
                    strings=list(c.record.strings),
                    problem=c.record.problem,
                    dns=c.check.state,
                    published=list(c.check.published),
                )
                for c in checked
            ]
        )

    def operations(self, p: str) -> list[Operation[Any, Any]]:
        admin = Permission.VIEW_ADMIN
        return [
            Operation("GET", f"{p}/settings/policy", admin,
                      "The effective policy per group, each value with its source, and the rules",
                      self.effective_policy, NoQuery, NoBody, EffectivePolicy),
            Operation("GET", f"{p}/settings/consent-texts", admin,
                      "The consent texts per block set and language, with their hash",
                      self.consent_texts, NoQuery, NoBody, LetterTexts),
            Operation("GET", f"{p}/settings/dkim", admin,
                      "Each DKIM key's DNS record to publish, and whether DNS shows it",
                      self.dkim_records, NoQuery, NoBody, DkimRecords),
        ]  # fmt: skip
