"""Prospect-facing texts per language and their formats, from
gateway/texts/catalogs/{language}.toml.

Every text a prospect sees lives in those files, including how dates, times and numbers are
written; Python only picks the key. Every moment a page, a mail or a PDF shows goes through
`Catalog.moment` (or its halves `date` and `time`): in the one zone of `[branding] timezone`,
whatever the language, and always followed by the zone's name, so that a prospect, an agent
and a court read the same instant. Keys are the TOML tables joined with dots
(`[download] title = ...` is `download.title`). The files are read by the one loader
(gateway.texts.files) for every language of rules.language's one list, so a missing
translation stops start-up instead of showing a hole on a page.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.texts.files import TEXTS, load_language_files
from rules.language import SHIPPED_LANGUAGES, primary_subtag

SIZE_UNITS = ("kB", "MB", "GB", "TB")
DEFAULT_TIMEZONE = "Europe/Berlin"


class Catalog:
    """One language's texts with `t(key, **params)` for templates."""

    def __init__(
        self, language: str, texts: Mapping[str, Any], zone: str = DEFAULT_TIMEZONE
    ) -> None:
        self.language = language
        self._texts = dict(texts)
        self.zone = time_zone(zone)

    def keys(self) -> set[str]:
        return set(self._texts)

    def t(self, key: str, /, **params: Any) -> str:
        text = self._texts[key]
        return str(text).format(**params) if params else str(text)

    def plural(self, key: str, count: int, **params: Any) -> str:
        """`key.one` for 1, `key.other` otherwise (enough for de, en and es)."""
        return self.t(f"{key}.{'one' if count == 1 else 'other'}", count=count, **params)

    def moment(self, moment: datetime, *, seconds: bool = False) -> str:
        """Date and time in our zone, with the zone's name: "23.11.2026, 11:00 Uhr MEZ"."""
        return self.t("format.moment", date=self.date(moment), time=self.time(moment, seconds))

    def date(self, moment: datetime) -> str:
        """A calendar date in our zone and this language's style, e.g. 23.11.2026."""
        local = self._local(moment)
        months = self._texts["format.months"]
        return self.t(
            "format.date",
            day=local.day,
            month=local.month,
            month_name=months[local.month - 1],
            year=local.year,
        )

    def time(self, moment: datetime, seconds: bool = False) -> str:
        """The time of day in our zone with the zone's name, e.g. "11:00 Uhr MEZ"."""
        local = self._local(moment)
        return self.t(
            "format.time_seconds" if seconds else "format.time",
            hour=local.hour,
            minute=local.minute,
            second=local.second,
            zone=self.zone_name(local),
        )

    def zone_name(self, local: datetime) -> str:
        """The language's name for the zone at that moment (MEZ/MESZ in German), else its
        abbreviation (CET, JST), else the offset (UTC+3) where the zone has no letters."""
        abbreviation = local.tzname() or ""
        named = self._texts.get(f"format.zone_names.{abbreviation}")
        if named:
            return str(named)
        if abbreviation.isalpha():
            return abbreviation
        return utc_offset(local.utcoffset() or timedelta())

    def _local(self, moment: datetime) -> datetime:
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("moments to show must be aware datetimes")
        return moment.astimezone(self.zone)

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


def load_catalogs(directory: Path = TEXTS, zone: str = DEFAULT_TIMEZONE) -> dict[str, Catalog]:
    return {
        language: Catalog(language, texts, zone)
        for language, texts in load_language_files(directory).items()
    }


@lru_cache(maxsize=8)
def shipped_catalogs(zone: str = DEFAULT_TIMEZONE) -> dict[str, Catalog]:
    """The shipped texts, read once per zone, for mails composed outside a web request."""
    return load_catalogs(TEXTS, zone)


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone of that name; ValueError naming it when the zone database lacks it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)"
        ) from exc


def utc_offset(offset: timedelta) -> str:
    """UTC, UTC+3, UTC-3:30."""
    minutes = int(offset.total_seconds() // 60)
    if not minutes:
        return "UTC"
    sign, minutes = ("+" if minutes > 0 else "-"), abs(minutes)
    hours, rest = divmod(minutes, 60)
    return f"UTC{sign}{hours}" + (f":{rest:02d}" if rest else "")


def negotiate(accept_language: str, default: str) -> str:
    """The best of our languages for an Accept-Language header, else `default`."""
    best, best_q = default, 0.0
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = primary_subtag(tag)
        if primary not in SHIPPED_LANGUAGES:
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
