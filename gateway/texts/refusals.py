"""Refusals a person can act on, said in the language of whoever reads them.

A desk (users, logins, webhooks, the queue, links and letters) refuses with a key under
`[refused]` in the catalogs and the values its text names. The console says it in the
reader's language (`said`); the CLI, the API and the log read `str()`, the English text from
the same catalog, so each sentence is written once per language. Callers choose their answer
by the exception's type or `key`, never by reading its words.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.texts.catalog import Catalog, shipped_catalogs

ENGLISH = "en"


@dataclass(frozen=True)
class Term:
    """A word a refusal names that the catalogs translate too (a status: "zugestellt")."""

    key: str


class Refused(Exception):
    """A request that was not carried out, for a reason its asker can see and fix."""

    def __init__(self, key: str, /, **params: object) -> None:
        self.key = key
        self.params = params
        super().__init__(self.said(shipped_catalogs()[ENGLISH]))

    def said(self, catalog: Catalog) -> str:
        params = {
            name: catalog.t(value.key) if isinstance(value, Term) else value
            for name, value in self.params.items()
        }
        return catalog.t(f"refused.{self.key}", **params)
