"""Wording of the consent PDF and the agent's confirmation, per language, and the way both
write a moment in time. Apart from consent_pdf so the confirmation does not load fpdf2."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from gateway.i18n import DEFAULT_TIMEZONE, load_language_files, shipped_catalogs

TEXTS = Path(__file__).parent / "texts"
LANGUAGES = ("de", "en", "es")
FALLBACK_LANGUAGE = "en"


class TextsError(ValueError):
    """A wording file is missing, unreadable, or its keys differ from the German one."""


def language_of(language: str) -> str:
    """``de``, ``de-DE``, ``es_ES`` -> ``de``/``es``; anything we do not ship -> English."""
    primary = re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]
    return primary if primary in LANGUAGES else FALLBACK_LANGUAGE


@lru_cache(maxsize=8)
def load_texts(kind: str) -> Mapping[str, Mapping[str, str]]:
    """All languages of ``gateway/texts/{kind}/``, flattened (``fields.ip``), same keys each."""
    try:
        files = load_language_files(TEXTS / kind)
    except ValueError as exc:
        raise TextsError(str(exc)) from exc
    return {
        language: {key: str(value) for key, value in texts.items()}
        for language, texts in files.items()
    }


def moment(
    texts: Mapping[str, str], when: datetime, language: str, zone: str = DEFAULT_TIMEZONE
) -> str:
    """A point in time as the wording file writes it: local and UTC side by side.

    The local half is the pages' own (`Catalog.moment` with seconds, in `[branding]
    timezone`, the zone named), so the PDF, the mail and the pages show the same instant.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("consent times must be aware datetimes")

    def parts(at: datetime) -> dict[str, int]:
        return {
            "year": at.year,
            "month": at.month,
            "day": at.day,
            "hour": at.hour,
            "minute": at.minute,
            "second": at.second,
        }

    local = shipped_catalogs(zone)[language_of(language)].moment(when, seconds=True)
    utc = texts["format.utc"].format(**parts(when.astimezone(UTC)))
    return texts["format.moment"].format(local=local, utc=utc)


# -- text the core fonts can show ------------------------------------------------------------
