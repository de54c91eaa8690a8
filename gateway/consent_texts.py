"""Wording of the consent PDF and the agent's confirmation, per language, and the way both
write a moment in time. Apart from consent_pdf so the confirmation does not load fpdf2."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

TEXTS = Path(__file__).parent / "texts"
LANGUAGES = ("de", "en", "es")
FALLBACK_LANGUAGE = "en"
LOCAL_ZONE = ZoneInfo("Europe/Berlin")


class TextsError(ValueError):
    """A wording file is missing, unreadable, or its keys differ from the German one."""


def language_of(language: str) -> str:
    """``de``, ``de-DE``, ``es_ES`` -> ``de``/``es``; anything we do not ship -> English."""
    primary = re.split(r"[-_]", language.strip().lower(), maxsplit=1)[0]
    return primary if primary in LANGUAGES else FALLBACK_LANGUAGE


@lru_cache(maxsize=8)
def load_texts(kind: str) -> Mapping[str, Mapping[str, str]]:
    """All languages of ``gateway/texts/{kind}/``, flattened (``fields.ip``), same keys each."""
    directory = TEXTS / kind
    catalogs: dict[str, dict[str, str]] = {}
    for language in LANGUAGES:
        path = directory / f"{language}.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TextsError(f"{path}: {exc}") from exc
        catalogs[language] = _flatten(data)
    reference = catalogs[LANGUAGES[0]].keys()
    for language, catalog in catalogs.items():
        missing, extra = reference - catalog.keys(), catalog.keys() - reference
        if missing or extra:
            raise TextsError(
                f"{directory / language}.toml: keys differ from {LANGUAGES[0]}.toml:"
                f" missing {sorted(missing)}, extra {sorted(extra)}"
            )
    return catalogs


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def moment(texts: Mapping[str, str], when: datetime) -> str:
    """A point in time as the wording file writes it: Europe/Berlin and UTC side by side."""
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

    local = texts["format.local"].format(**parts(when.astimezone(LOCAL_ZONE)))
    utc = texts["format.utc"].format(**parts(when.astimezone(UTC)))
    return texts["format.moment"].format(local=local, utc=utc)


# -- text the core fonts can show ------------------------------------------------------------
