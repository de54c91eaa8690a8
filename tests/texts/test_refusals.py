"""The desks' refusals: every key a desk raises has its text in every language, each
language names the same values, and no text stands in the catalogs that nothing raises.

The source is read rather than each refusal provoked: a key mistyped in a rarely taken
branch would otherwise surface as a KeyError in front of an admin."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

import gateway.agent_actions
import gateway.agent_logins
import gateway.console.api_keys
import gateway.outbound.queue
import gateway.users
import gateway.webhooks.addresses
import gateway.webhooks.desk
from gateway.texts.catalog import shipped_catalogs
from gateway.texts.refusals import Refused, Term

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "web").rglob("*.py")]
assert gateway.agent_actions and gateway.agent_logins and gateway.console.api_keys
assert gateway.outbound.queue and gateway.users and gateway.webhooks.desk
assert gateway.webhooks.addresses


def _refusal_types() -> set[str]:
    found: set[str] = set()
    todo: list[type] = [Refused]
    while todo:
        kind = todo.pop()
        found.add(kind.__name__)
        todo.extend(kind.__subclasses__())
    return found


def _raised_keys() -> tuple[set[str], set[str]]:
    """The keys raised as constants, and the fixed beginnings of keys built by f-strings."""
    names = _refusal_types()
    keys: set[str] = set()
    prefixes: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name not in names:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                keys.add(first.value)
            elif isinstance(first, ast.JoinedStr):
                head = first.values[0]
                assert isinstance(head, ast.Constant), ast.unparse(first)
                prefixes.add(str(head.value))
    return keys, prefixes


def _fields(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def test_every_raised_key_has_its_text_and_every_text_is_raised() -> None:
    known = shipped_catalogs()["en"].keys()
    texts = {key.removeprefix("refused.") for key in known if key.startswith("refused.")}
    keys, prefixes = _raised_keys()
    assert len(keys) > 50 and {"action.not_held_", "action.expiry_beyond_"} <= prefixes
    assert keys - texts == set(), "raised without a text"
    for prefix in prefixes:
        assert any(text.startswith(prefix) for text in texts), prefix
    unused = {t for t in texts - keys if not any(t.startswith(p) for p in prefixes)}
    assert unused == set(), "texts nothing raises"


@pytest.mark.parametrize("language", ["de", "es"])
def test_each_language_names_the_values_english_names(language: str) -> None:
    english, other = shipped_catalogs()["en"], shipped_catalogs()[language]
    known = english.keys()
    for key in sorted(k for k in known if k.startswith("refused.")):
        assert _fields(other.t(key)) == _fields(english.t(key)), key


def test_the_english_text_is_the_message_and_a_term_is_translated() -> None:
    refused = gateway.outbound.queue.QueueError(
        "queue.no_retry", delivery="d1", status=Term("work.queue_status.delivered")
    )
    assert str(refused) == "delivery d1 is delivered; nothing to retry"
    german = refused.said(shipped_catalogs()["de"])
    assert german == "Die Zustellung d1 ist zugestellt; es gibt nichts zu wiederholen."
    assert refused.key == "queue.no_retry"
