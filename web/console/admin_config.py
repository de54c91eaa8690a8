"""The admins' read-only pages about the installation's settings: the effective policy of each
group, the consent texts of each block set and language, and the DKIM records to publish.

Each page only reads what the relay already computed from its settings (gateway/console/
effective_policy.py, letter_texts.py, dkim_records.py); this module turns the values into
words of the reader's language. VIEW_ADMIN opens them, so auditors see them too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.access import Permission
from gateway.config import Settings
from gateway.console.dkim_records import check_records, dkim_records
from gateway.console.effective_policy import DEFAULT_SOURCE, policy_overview
from gateway.console.letter_texts import letter_texts
from gateway.dns_lookup import DnsLookup
from gateway.letters.blocks import BlockSets
from gateway.texts.catalog import Catalog
from rules.policy import MiB
from web.console.admin import DKIM, POLICY, TEXTS
from web.console.view import ConsoleView
from web.guard import Routes

SIZES = frozenset({"link_attachments_over", "link_total_over"})
DAYS = frozenset({"download_link_days", "letter_link_days"})
MATCH_CRITERIA = ("senders", "groups", "recipient_domains", "subject_prefixes", "filenames")


@dataclass(frozen=True)
class Shown:
    """One setting as the page shows it."""

    name: str
    label: str
    value: str
    source: str
    overridden: bool  # set by a group, not the default
    rules: str


class ConfigPages:
    def __init__(self, view: ConsoleView, settings: Settings, lookup: DnsLookup) -> None:
        self.view = view
        self.settings = settings
        self.lookup = lookup
        self.overview = policy_overview(settings.policy_config())
        self.texts = letter_texts(BlockSets(settings))

    def register(self, routes: Routes) -> None:
        see = Permission.VIEW_ADMIN
        routes.console("GET", POLICY, self.policy, see)
        routes.console("GET", TEXTS, self.letter_texts, see)
        routes.console("GET", DKIM, self.dkim, see)

    async def policy(self, request: web.Request) -> web.StreamResponse:
        catalog = self.view.catalog(request)
        groups = [
            (
                catalog.t("work.config.no_group")
                if group.group is None
                else catalog.t("work.config.group", name=group.group),
                [
                    Shown(
                        v.name,
                        catalog.t(f"work.config.field.{v.name}"),
                        human(catalog, v.name, v.value),
                        source_label(catalog, v.source),
                        v.source != DEFAULT_SOURCE,
                        ", ".join(v.rules),
                    )
                    for v in group.values
                ],
            )
            for group in self.overview.groups
        ]
        rules = [
            (
                rule.name,
                [
                    (catalog.t(f"work.config.match.{c}"), ", ".join(getattr(rule.match, c)))
                    for c in MATCH_CRITERIA
                    if getattr(rule.match, c)
                ],
                [
                    (name, catalog.t(f"work.config.field.{name}"), human(catalog, name, value))
                    for name, value in rule.changes
                ],
            )
            for rule in self.overview.rules
        ]
        return self.view.render(
            request,
            "console/admin_policy.html",
            catalog.t("work.config.policy_title"),
            groups=groups,
            rules=rules,
        )

    async def letter_texts(self, request: web.Request) -> web.StreamResponse:
        return self.view.render(
            request,
            "console/admin_texts.html",
            self.view.catalog(request).t("work.config.texts_title"),
            sets=self.texts,
        )

    async def dkim(self, request: web.Request) -> web.StreamResponse:
        checked = await check_records(dkim_records(self.settings), self.lookup)
        return self.view.render(
            request,
            "console/admin_dkim.html",
            self.view.catalog(request).t("work.config.dkim_title"),
            records=checked,
        )


def source_label(catalog: Catalog, source: str) -> str:
    """ "group sales" in the reader's words; rules/policy.py names the layers."""
    if source == DEFAULT_SOURCE:
        return catalog.t("work.config.source_default")
    kind, _, name = source.partition(" ")
    return catalog.t(f"work.config.source_{kind}", name=name)


def human(catalog: Catalog, name: str, value: Any) -> str:
    """A policy value as a reader says it: sizes in MB, days, yes or no, lists."""
    if name in SIZES:
        size = int(value)
        whole_mib = size >= MiB and size % MiB == 0  # as the settings likely wrote it
        return f"{catalog.size(size)} ({size // MiB} MiB)" if whole_mib else catalog.size(size)
    if name in DAYS:
        return catalog.plural("work.config.days", int(value))
    if isinstance(value, bool):
        return catalog.t("work.config.yes" if value else "work.config.no")
    if isinstance(value, Collection) and not isinstance(value, str):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return ", ".join(str(item) for item in items) or catalog.t("work.config.none")
    return str(value)
