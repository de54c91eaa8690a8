"""Texts: one list of shipped languages, one loader, one check that every language of every
kind of text has the same keys, run by check-config and by serve before anything starts.

A hole in a translation must stop start-up, not reach a prospect as a missing line; a
language added to the list without its files must be named with the files it lacks.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.texts import catalog
from gateway.texts import files as text_files
from rules.language import SHIPPED_LANGUAGES, shipped_language
from tests.cli_runner import sealrelay, write_config
from tests.support import LETTER_TOML

ROOT = Path(__file__).resolve().parents[2]


def test_every_text_kind_has_every_language_with_the_same_keys() -> None:
    assert text_files.text_problems() == []
    names = {kind.name for kind in text_files.TEXT_KINDS}
    assert {"pages", "consent_pdf", "confirmation", "letter_expired", "dsn"} <= names
    assert {"linkblock text", "linkblock html"} <= names
    assert "letter block set default" in names
    for kind in text_files.TEXT_KINDS:
        keys = {language: kind.keys_of(language) for language in SHIPPED_LANGUAGES}
        assert all(keys.values()), kind.name
        assert len({frozenset(k) for k in keys.values()}) == 1, kind.name


def _drop_toml_key(text: str) -> tuple[str, str]:
    match = re.search(r"^(\w+) = .*$", text, re.M)
    assert match
    return text.replace(match[0], "", 1), match[1]


def _drop_checkbox(text: str) -> tuple[str, str]:
    match = re.search(r'^checkbox = ".*"$', text, re.M)
    assert match
    return text.replace(match[0], "", 1), "checkbox"


def _drop_template_subject(text: str) -> tuple[str, str]:
    match = re.search(r"\{%-? set subject.*?endset -?%\}|\{%-? set subject = .*?%\}", text, re.S)
    assert match
    return text.replace(match[0], "", 1), "subject"


def _drop_template_value(text: str) -> tuple[str, str]:
    assert "{{ url }}" in text
    return text.replace("{{ url }}", "(no link)"), "url"


EDITS: dict[str, Callable[[str], tuple[str, str]]] = {
    "pages": _drop_toml_key,
    "consent_pdf": _drop_toml_key,
    "confirmation": _drop_toml_key,
    "letter_expired": _drop_toml_key,
    "webhook_disabled": _drop_toml_key,
    "letter block set default": _drop_checkbox,
    "dsn": _drop_template_subject,
    "linkblock text": _drop_template_value,
    "linkblock html": _drop_template_value,
}


@pytest.mark.parametrize("kind", text_files.TEXT_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("language", SHIPPED_LANGUAGES)
def test_a_language_that_lacks_a_key_another_has_is_named(
    kind: text_files.TextKind, language: str, tmp_path: Path
) -> None:
    copy = kind.moved_to(tmp_path / "copy")
    shutil.copytree(kind.directory, copy.directory)
    path = copy.path(language)
    shorter, key = EDITS[kind.name](path.read_text(encoding="utf-8"))
    path.write_text(shorter, encoding="utf-8")
    [problem] = copy.problems()
    assert str(path) in problem
    assert "lacks" in problem and key in problem, problem


def test_a_language_file_that_is_missing_is_named(tmp_path: Path) -> None:
    pages = next(kind for kind in text_files.TEXT_KINDS if kind.name == "pages")
    copy = pages.moved_to(tmp_path / "texts")
    copy.directory.mkdir()
    for language in SHIPPED_LANGUAGES[:-1]:
        shutil.copy(pages.path(language), copy.path(language))
    [problem] = copy.problems()
    assert f"{copy.path(SHIPPED_LANGUAGES[-1])}: missing" in problem
    with pytest.raises(text_files.TextsError, match="missing"):
        catalog.load_catalogs(copy.directory)


def test_the_one_fallback_rule() -> None:
    assert shipped_language("de-DE") == "de"
    assert shipped_language("es_ES", "de") == "es"
    assert shipped_language("fr", "es") == "es"  # the configured default first
    assert shipped_language("fr") == "en"  # with none at hand, English
    assert shipped_language("fr", "xx") == "en"


def _tree_with_one_more_language(tmp_path: Path, language: str) -> Path:
    tree = tmp_path / "tree"
    for package in ("rules", "gateway", "web", "sealrelay"):
        shutil.copytree(
            ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    module = tree / "rules" / "language.py"
    listed = f"SHIPPED_LANGUAGES = {(*SHIPPED_LANGUAGES, language)!r}"
    source, changed = re.subn(r"^SHIPPED_LANGUAGES = .*$", listed, module.read_text(), flags=re.M)
    assert changed == 1
    module.write_text(source, encoding="utf-8")
    return tree


async def test_a_language_added_without_its_files_stops_check_config_and_serve(
    tmp_path: Path,
) -> None:
    tree = _tree_with_one_more_language(tmp_path, "fr")
    config = write_config(tmp_path / "etc")
    env = {"PYTHONPATH": str(tree)}
    checked = await sealrelay("check-config", "--config", str(config), env=env)
    served = await sealrelay("serve", "--config", str(config), env=env)
    for run in (checked, served):
        assert run.code == 1, run.err
        errors = [line for line in run.err.splitlines() if line.startswith("Error:")]
        for missing in (
            "catalogs/fr.toml",
            "catalogs/consent_pdf/fr.toml",
            "catalogs/confirmation/fr.toml",
            "catalogs/letter_expired/fr.toml",
            "templates/dsn/fr.txt.j2",
            "templates/linkblock/fr.txt.j2",
            "templates/linkblock/fr.html.j2",
            "letters/default/fr/blocks.toml",
        ):
            line = f"Error: config error: texts: {tree}/gateway/texts/{missing}: missing"
            assert any(error.startswith(line) for error in errors), (line, run.err)
    assert not (tmp_path / "etc" / "relay.db").exists()


async def test_check_config_warns_of_a_broker_block_set_whose_languages_differ(
    tmp_path: Path,
) -> None:
    custom = tmp_path / "custom"
    shutil.copytree(text_files.SHIPPED_BLOCK_SET, custom)
    blocks = custom / "en" / "blocks.toml"
    shorter, _ = _drop_checkbox(blocks.read_text(encoding="utf-8"))
    blocks.write_text(shorter, encoding="utf-8")
    config = write_config(
        tmp_path,
        extra=LETTER_TOML
        + f'block_sets = {{ custom = "{custom}" }}\n'
        + '[policy]\nletter_block_set = "custom"\n'
        + "[smtp]\nallow_plaintext_auth_on_loopback = true\n",
    )
    run = await sealrelay("check-config", str(config))
    assert run.code == 0, run.err
    assert (
        f"Warning: letter.block_sets.custom: {blocks}: lacks block.withdrawal.checkbox,"
        " which de, es has"
    ) in run.err.splitlines()
