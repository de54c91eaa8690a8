"""A finding about the settings, shared by check-config and every check it gathers.

Its own module so that a check (gateway/letters/letter_keys.py) can report problems without
importing check-config, which imports every check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One finding: an error stops start-up, a warning is worth a look."""

    key: str
    text: str
    error: bool = True

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"
