"""The consent texts of every block set and language, for the admins' texts page: each text as
a prospect reads it, the placeholders its source names and where their values come from, and
the hash a consent records for the set's blocks.

The texts come from the same `BlockSets` the letters are written from, and the hash from the
same `texts_sha256`, so an auditor can compare a consent's `texts=sha256:` with this page.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.letters.blocks import PER_LETTER, SETTING_OF_VALUE, BlockSets
from gateway.letters.evidence import texts_sha256

# the letter's own texts, in the order a prospect meets them
LETTER_PLACES = (
    "letter_subject",
    "greeting",
    "greeting_without_name",
    "intro",
    "link_label",
    "outro",
    "button",
)


class Origin(StrEnum):
    SETTING = "setting"  # filled from the settings when the set is loaded
    PER_LETTER = "per_letter"  # filled for each letter when it is sent
    UNKNOWN = "unknown"  # no value anywhere: start-up refuses such a set


@dataclass(frozen=True)
class Placeholder:
    name: str
    origin: Origin
    setting: str | None  # where a broker sets the value ("[letter] company_email")


@dataclass(frozen=True)
class ShownText:
    place: str  # "intro", "block widerruf text"
    text: str
    placeholders: tuple[Placeholder, ...]


@dataclass(frozen=True)
class ShownBlockTexts:
    id: str
    required: bool
    texts: tuple[ShownText, ...]  # title, text and, if it has one, the checkbox


@dataclass(frozen=True)
class BlockSetTexts:
    name: str
    language: str
    texts_sha256: str
    letter: tuple[ShownText, ...]
    blocks: tuple[ShownBlockTexts, ...]


def placeholder(name: str) -> Placeholder:
    if name in SETTING_OF_VALUE:
        return Placeholder(name, Origin.SETTING, SETTING_OF_VALUE[name])
    if name in PER_LETTER:
        return Placeholder(name, Origin.PER_LETTER, None)
    return Placeholder(name, Origin.UNKNOWN, None)


def letter_texts(block_sets: BlockSets) -> tuple[BlockSetTexts, ...]:
    """Every loaded set in every language, by set name, then language."""
    return tuple(
        _set_texts(block_sets, name, language) for name, language in sorted(block_sets.sets)
    )


def _set_texts(block_sets: BlockSets, name: str, language: str) -> BlockSetTexts:
    shown = block_sets.get(name, language)
    used = block_sets.placeholders[(name, language)]

    def text(place: str, value: str) -> ShownText:
        return ShownText(place, value, tuple(placeholder(n) for n in used.get(place, ())))

    blocks = tuple(
        ShownBlockTexts(
            block.id,
            block.required,
            (
                text(f"block {block.id} title", block.title),
                text(f"block {block.id} text", block.text),
                *(
                    (text(f"block {block.id} checkbox", block.checkbox),)
                    if block.checkbox is not None
                    else ()
                ),
            ),
        )
        for block in shown.blocks
    )
    return BlockSetTexts(
        name,
        language,
        texts_sha256(shown.blocks),
        tuple(text(place, getattr(shown, place)) for place in LETTER_PLACES),
        blocks,
    )
