"""The way the consent PDF and the agent's mails write a moment in time, from their wording
(gateway.texts.files.load_texts). Apart from consent_pdf so the confirmation does not load
fpdf2."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from gateway.texts.catalog import DEFAULT_TIMEZONE, shipped_catalogs
from rules.language import shipped_language


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

    local = shipped_catalogs(zone)[shipped_language(language)].moment(when, seconds=True)
    utc = texts["format.utc"].format(**parts(when.astimezone(UTC)))
    return texts["format.moment"].format(local=local, utc=utc)
