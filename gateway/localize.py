"""Sizes and dates the way each supported language writes them, for mails and pages."""

from __future__ import annotations

from datetime import date

MONTHS = {
    "de": (
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ),
    "en": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "es": (
        "enero",
        "febrero",
        "marzo",
        "abril",
        "mayo",
        "junio",
        "julio",
        "agosto",
        "septiembre",
        "octubre",
        "noviembre",
        "diciembre",
    ),
}


def format_size(size: int, language: str) -> str:
    """Decimal units, as file managers and phones show them: 8.4 MB / 8,4 MB."""
    units = ("B", "KB", "MB", "GB")
    value, unit = float(size), units[0]
    for unit in units:
        if value < 1000 or unit == units[-1]:
            break
        value /= 1000
    text = f"{value:.0f}" if unit == "B" or value >= 100 else f"{value:.1f}"
    if language in ("de", "es"):
        text = text.replace(".", ",")
    return f"{text} {unit}"


def format_date(day: date, language: str) -> str:
    month = MONTHS.get(language, MONTHS["en"])[day.month - 1]
    if language == "de":
        return f"{day.day}. {month} {day.year}"
    if language == "es":
        return f"{day.day} de {month} de {day.year}"
    return f"{day.day} {month} {day.year}"
