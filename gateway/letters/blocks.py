"""Letter block sets: the consent texts a registered letter shows, loaded and checked once.

A set is a folder per language (`blocks.toml` and the Markdown files it names). Its
placeholders are filled from the settings when the set is loaded, except the per-letter ones
(`{recipient_name}`, ...) kept for when a letter is sent; a placeholder without a value stops
start-up, so no prospect ever reads one as written.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from markupsafe import Markup

from gateway.config import Settings
from gateway.letters.evidence import ShownBlock
from gateway.texts.files import SHIPPED_BLOCK_SET, TextsError, read_toml
from rules.language import SHIPPED_LANGUAGES

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
# a placeholder, its closing emphasis, and the period of the sentence it ends
_PERIOD_AFTER = re.compile(r"(\{([a-z_]+)\}[*_]*)\.")
_markdown = MarkdownIt("commonmark", {"html": False})


# Values from the settings, and where a broker sets each one.
SETTING_OF_VALUE = {
    "company": "[branding] company_name",
    "company_address": "[letter] company_address",
    "company_email": "[letter] company_email",
    "company_phone": "[letter] company_phone",
    "commission": "[letter] commission",
}
# Values of each letter, filled when it is sent; only these places may hold them.
PER_LETTER = ("subject", "recipient_name", "agent_name", "days")
PER_LETTER_PLACES = ("letter_subject", "greeting", "intro", "outro")


class UnfilledPlaceholders(ValueError):
    """Text holds placeholders without a value: it must never reach a reader."""

    def __init__(self, names: list[str]) -> None:
        super().__init__("no value for " + ", ".join(f"{{{name}}}" for name in names))
        self.names = names


def fill(text: str, values: Mapping[str, str]) -> str:
    """Placeholders like {company} replaced by their values; broker comments (<!-- -->) go.

    A placeholder without a value raises UnfilledPlaceholders rather than reaching a
    prospect as written. Values are inserted once, never read for placeholders again. A value
    that ends a sentence itself ("inkl. MwSt.") takes the place of the text's period after it.
    """
    text = _COMMENT.sub("", text)
    missing = sorted({match[1] for match in _PLACEHOLDER.finditer(text)} - values.keys())
    if missing:
        raise UnfilledPlaceholders(missing)
    text = _PERIOD_AFTER.sub(lambda m: m[1] if values[m[2]].endswith(".") else m[0], text)
    return _PLACEHOLDER.sub(lambda match: values[match[1]], text).strip()


@functools.lru_cache(maxsize=512)
def markdown_html(text: str) -> Markup:
    """HTML of the broker's Markdown, safe to place in a page or mail as it is: raw HTML is
    off, so every `<` of the source arrives escaped once, and only once. Remembered: every
    view of a letter renders the same few blocks of its block set again."""
    return Markup(_markdown.render(text))  # noqa: S704


@dataclass(frozen=True)
class BlockSet:
    button: str
    letter_subject: str
    greeting: str  # the letter's first line, naming {recipient_name}
    greeting_without_name: str  # when the offer's To or Cc gives no name
    intro: str
    link_label: str
    outro: str
    blocks: tuple[ShownBlock, ...]


class BlockSetError(ValueError):
    """Block sets that cannot be used as configured; the message names every problem."""


class BlockSets:
    """Every block set a letter can use, in every language, loaded and checked at start-up:
    a text whose placeholder has no value stops start-up, so no letter ever shows one."""

    def __init__(self, settings: Settings) -> None:
        letter = settings.letter
        values = {
            "company": contracting_company(settings),
            "company_address": letter.company_address,
            "company_email": letter.company_email,
            "company_phone": letter.company_phone,
            "commission": letter.commission,
        }
        directories = {"default": SHIPPED_BLOCK_SET, **letter.block_sets}
        problems: list[str] = []
        self.sets: dict[tuple[str, str], BlockSet] = {}
        # per set and language: each text's place and the placeholders its source names
        self.placeholders: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {}
        for name in sorted(used_block_sets(settings)):
            for language in SHIPPED_LANGUAGES:
                texts = _Texts({key: value for key, value in values.items() if value})
                self.sets[(name, language)] = _load(directories[name] / language, texts)
                self.placeholders[(name, language)] = texts.used
                problems += [
                    f'letter block set "{name}", language {language}: {problem}'
                    for problem in texts.problems
                ]
        if problems:
            raise BlockSetError(
                "letter texts hold placeholders that would reach prospects as written:\n  "
                + "\n  ".join(problems)
            )

    def get(self, name: str, language: str) -> BlockSet:
        return self.sets[(name, language)]


def contracting_company(settings: Settings) -> str:
    """The brokerage the letters' texts name as the prospect's contracting party: only a
    name IT set. The default, sealrelay's own name, brands a page well enough, but in a
    brokerage contract it would name the wrong party, so unset it stops start-up as a
    missing address does."""
    branding = settings.branding
    return branding.company_name if "company_name" in branding.model_fields_set else ""


def used_block_sets(settings: Settings) -> set[str]:
    """The block sets the policy, a group or a rule can choose for a letter."""
    chosen = [
        settings.policy.letter_block_set,
        *(group.letter_block_set for group in settings.groups),
        *(rule.set.letter_block_set for rule in settings.rules),
    ]
    return {name for name in chosen if name is not None}


class _Texts:
    """Fills one block set's texts and notes where each placeholder without a value is."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.unfilled: dict[str, list[str]] = {}
        self.used: dict[str, tuple[str, ...]] = {}

    def fill(self, place: str, text: str, *, named: str | None = None) -> str:
        """`named`: the key under which `used` records the text's placeholders, if not its
        place (a block's text is reported by its file, shown by its block)."""
        found = _PLACEHOLDER.findall(_COMMENT.sub("", text))
        self.used[named or place] = tuple(dict.fromkeys(found))
        values = dict(self.values)
        if place in PER_LETTER_PLACES:  # kept for the letter: filled when it is sent
            values.update({name: f"{{{name}}}" for name in PER_LETTER})
        try:
            return fill(text, values)
        except UnfilledPlaceholders as exc:
            for name in exc.names:
                self.unfilled.setdefault(name, []).append(place)
            return text

    @property
    def problems(self) -> list[str]:
        return [_unfilled(name, places) for name, places in sorted(self.unfilled.items())]


def _unfilled(name: str, places: list[str]) -> str:
    where = f"{{{name}}} in {', '.join(places)}"
    if name in SETTING_OF_VALUE:
        return f"{where} has no value: set {SETTING_OF_VALUE[name]}"
    if name in PER_LETTER:
        return f"{where}: {{{name}}} is filled only in {', '.join(PER_LETTER_PLACES)}"
    known = ", ".join(f"{{{known}}}" for known in (*SETTING_OF_VALUE, *PER_LETTER))
    return f"{where}: not a placeholder (known: {known})"


def _load(directory: Path, texts: _Texts) -> BlockSet:
    try:
        data = read_toml(directory / "blocks.toml")
        blocks = tuple(
            ShownBlock(
                id=block["id"],
                title=texts.fill(f"block {block['id']} title", block["title"]),
                text=texts.fill(
                    block["file"],
                    (directory / block["file"]).read_text(encoding="utf-8"),
                    named=f"block {block['id']} text",
                ),
                checkbox=(
                    texts.fill(f"block {block['id']} checkbox", block["checkbox"])
                    if "checkbox" in block
                    else None
                ),
            )
            for block in data["block"]
        )
        return BlockSet(
            button=texts.fill("button", data["button"]),
            letter_subject=texts.fill("letter_subject", data["letter_subject"]),
            greeting=texts.fill("greeting", data.get("greeting", "")),
            greeting_without_name=texts.fill(
                "greeting_without_name", data.get("greeting_without_name", "")
            ),
            intro=texts.fill("intro", data["intro"]),
            link_label=texts.fill("link_label", data["link_label"]),
            outro=texts.fill("outro", data["outro"]),
            blocks=blocks,
        )
    except (OSError, KeyError, TextsError) as exc:
        raise ValueError(f"letter block set {directory}: {exc}") from exc
