"""Prospect-facing texts per language, from gateway/texts/{de,en,es}.toml, and their formats.

Every text a prospect sees lives in those files, including how dates and numbers are
written; Python only picks the key. Keys are the TOML tables joined with dots
(`[download] title = ...` is `download.title`). All languages must have the same keys, so a
missing translation stops start-up instead of showing a hole on a page.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LANGUAGES = ("de", "en", "es")
TEXTS = Path(__file__).parent / "texts"
SIZE_UNITS = ("kB", "MB", "GB", "TB")


class Catalog:
    """One language's texts with `t(key, **params)` for templates."""

    def __init__(self, language: str, texts: Mapping[str, Any]) -> None:
        self.language = language
        self._texts = dict(texts)
        try:
            self.zone = ZoneInfo(self._texts["format.timezone"])
        except ZoneInfoNotFoundError:
            self.zone = ZoneInfo("UTC")

    def keys(self) -> set[str]:
        return set(self._texts)

    def t(self, key: str, **params: Any) -> str:
        text = self._texts[key]
        return str(text).format(**params) if params else str(text)

    def plural(self, key: str, count: int, **params: Any) -> str:
        """`key.one` for 1, `key.other` otherwise (enough for de, en and es)."""
        return self.t(f"{key}.{'one' if count == 1 else 'other'}", count=count, **params)

    def date(self, moment: datetime) -> str:
        """A calendar date in this language's zone and style, e.g. 23.11.2026."""
        local = moment.astimezone(self.zone)
        months = self._texts["format.months"]
        return self.t(
            "format.date",
            day=local.day,
            month=local.month,
            month_name=months[local.month - 1],
            year=local.year,
        )

    def number(self, value: float, decimals: int) -> str:
        text = f"{value:,.{decimals}f}"
        return (
            text.replace(",", "\0")
            .replace(".", self.t("format.decimal"))
            .replace("\0", self.t("format.thousands"))
        )

    def size(self, size: int) -> str:
        """Decimal (SI) units as file managers show them: 8388608 bytes is 8,4 MB in German."""
        if size < 1000:
            return self.t("format.bytes", count=size)
        value = float(size)
        for unit in SIZE_UNITS:
            value /= 1000
            if value < 999.5 or unit == SIZE_UNITS[-1]:
                break
        return f"{self.number(value, 1 if value < 99.95 else 0)} {unit}"


def load_language_files(directory: Path) -> dict[str, dict[str, Any]]:
    """`{language}.toml` of every language in `directory`, flattened, with the same keys.

    A missing translation stops start-up instead of showing a hole to a prospect.
    """
    files = {}
    for language in LANGUAGES:
        path = directory / f"{language}.toml"
        try:
            files[language] = _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
    reference = files[LANGUAGES[0]].keys()
    for language, flat in files.items():
        missing, extra = reference - flat.keys(), flat.keys() - reference
        if missing or extra:
            raise ValueError(
                f"{directory / language}.toml: keys differ from {LANGUAGES[0]}.toml:"
                f" missing {sorted(missing)}, extra {sorted(extra)}"
            )
    return files


def load_catalogs(directory: Path = TEXTS) -> dict[str, Catalog]:
    return {
        language: Catalog(language, texts)
        for language, texts in load_language_files(directory).items()
    }


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def negotiate(accept_language: str, default: str) -> str:
    """The best of our languages for an Accept-Language header, else `default`."""
    best, best_q = default, 0.0
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in LANGUAGES:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        # earlier entries win ties, as the header lists preferences in order
        q -= position * 1e-6
        if q > best_q:
            best, best_q = primary, q
    return best
