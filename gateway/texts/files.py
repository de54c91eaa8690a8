"""The one loader of per-language text files, and the one check that all of them are there.

Every text a broker may change lives in a file per shipped language (rules.language
`SHIPPED_LANGUAGES`): the page catalogs (`texts/{language}.toml`), the mail and PDF wordings
(`texts/{kind}/{language}.toml`), the per-language templates (`templates/dsn/`,
`templates/linkblock/`) and the letter block sets (`letters/{set}/{language}/`). Each kind is
declared once in `TEXT_KINDS` with where a language's file is and how to read its keys, so a
language added to the list without its files, or a file that lacks a key another language has,
is named by `text_problems` at check-config and before serve starts, instead of showing a hole
to a prospect. Callers read TOML through `load_language_files` / `load_texts`, never tomllib.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, meta, nodes

from rules.language import SHIPPED_LANGUAGES

HERE = Path(__file__).parent
TEXTS = HERE / "catalogs"
TEMPLATES = HERE / "templates"
LETTERS = HERE / "letters"
SHIPPED_BLOCK_SET = LETTERS / "default"


class TextsError(ValueError):
    """A language's text file is missing, unreadable, or lacks keys another language has."""


@dataclass(frozen=True)
class TextKind:
    """One kind of per-language text: where each language's file is, how to read its keys."""

    name: str
    directory: Path
    file: str  # a language's file or folder in `directory`, e.g. "{language}.toml"
    read_keys: Callable[[Path], frozenset[str]]

    def path(self, language: str) -> Path:
        return self.directory / self.file.format(language=language)

    def keys_of(self, language: str) -> frozenset[str]:
        return self.read_keys(self.path(language))

    def moved_to(self, directory: Path) -> TextKind:
        """The same kind read from another directory (a broker's copy, a test's)."""
        return dataclasses.replace(self, directory=directory)

    def problems(self) -> list[str]:
        """Each language's missing or unreadable file, and each key it lacks."""
        keys: dict[str, frozenset[str]] = {}
        problems: list[str] = []
        for language in SHIPPED_LANGUAGES:
            path = self.path(language)
            if not path.exists():
                problems.append(
                    f"{path}: missing ({self.name} in {language},"
                    " a language of rules/language.py SHIPPED_LANGUAGES)"
                )
                continue
            try:
                keys[language] = self.read_keys(path)
            except TextsError as exc:
                problems.append(str(exc))
        return problems + _lacking(self, keys)


def _lacking(kind: TextKind, keys: Mapping[str, frozenset[str]]) -> list[str]:
    problems = []
    for language, own in keys.items():
        for key in sorted(frozenset[str]().union(*keys.values()) - own):
            having = ", ".join(other for other, theirs in keys.items() if key in theirs)
            problems.append(f"{kind.path(language)}: lacks {key}, which {having} has")
    return problems


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TextsError(f"{path}: {exc}") from exc


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tables joined with dots: `[download] title = ...` is `download.title`."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def toml_keys(path: Path) -> frozenset[str]:
    return frozenset(flatten(read_toml(path)))


def block_set_keys(path: Path) -> frozenset[str]:
    """The set's own keys and each block's (`block.withdrawal.checkbox`), by block id."""
    data = dict(read_toml(path))
    blocks: Iterable[Mapping[str, Any]] = data.pop("block", [])
    keys = set(flatten(data))
    for block in blocks:
        keys.update(f"block.{block.get('id')}.{field}" for field in block)
    return frozenset(keys)


_jinja = Environment(autoescape=False)  # noqa: S701 (only parsed, never rendered)


def template_keys(path: Path) -> frozenset[str]:
    """The values a template reads and the names it sets (the DSN's `subject`)."""
    try:
        tree = _jinja.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TemplateSyntaxError) as exc:
        raise TextsError(f"{path}: {exc}") from exc
    targets = [node.target for node in tree.find_all(nodes.Assign)]
    targets += [node.target for node in tree.find_all(nodes.AssignBlock)]
    names = {target.name for target in targets if isinstance(target, nodes.Name)}
    return frozenset(meta.find_undeclared_variables(tree) | names)


def block_set(name: str, directory: Path) -> TextKind:
    """A letter block set: `{language}/blocks.toml` and the Markdown files it names."""
    return TextKind(f"letter block set {name}", directory, "{language}/blocks.toml", block_set_keys)


def _wording(kind: str) -> TextKind:
    return TextKind(kind, TEXTS / kind, "{language}.toml", toml_keys)


TEXT_KINDS: tuple[TextKind, ...] = (
    TextKind("pages", TEXTS, "{language}.toml", toml_keys),
    _wording("consent_pdf"),
    _wording("confirmation"),
    _wording("letter_expired"),
    _wording("webhook_disabled"),
    TextKind("dsn", TEMPLATES / "dsn", "{language}.txt.j2", template_keys),
    TextKind("linkblock text", TEMPLATES / "linkblock", "{language}.txt.j2", template_keys),
    TextKind("linkblock html", TEMPLATES / "linkblock", "{language}.html.j2", template_keys),
    block_set("default", SHIPPED_BLOCK_SET),
)


def text_problems(kinds: Iterable[TextKind] = TEXT_KINDS) -> list[str]:
    """Every missing file and lacking key of every kind, for check-config and serve."""
    return [problem for kind in kinds for problem in kind.problems()]


def load_language_files(directory: Path) -> dict[str, dict[str, Any]]:
    """`{language}.toml` of every shipped language in `directory`, flattened, same keys each.

    A missing translation stops start-up instead of showing a hole to a prospect.
    """
    kind = TextKind(directory.name, directory, "{language}.toml", toml_keys)
    problems = kind.problems()
    if problems:
        raise TextsError("\n".join(problems))
    return {language: flatten(read_toml(kind.path(language))) for language in SHIPPED_LANGUAGES}


@lru_cache(maxsize=8)
def load_texts(kind: str) -> Mapping[str, Mapping[str, str]]:
    """All languages of the wording `texts/{kind}/` (`consent_pdf`, `confirmation`, ...)."""
    return {
        language: {key: str(value) for key, value in texts.items()}
        for language, texts in load_language_files(TEXTS / kind).items()
    }
