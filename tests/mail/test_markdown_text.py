"""The plain-text rendering of the broker's Markdown: what a reader of a text/plain part sees."""

from __future__ import annotations

from gateway.mail.markdown_text import RULE, markdown_text


def test_headings_emphasis_escapes_and_entities_become_plain_text() -> None:
    source = "### Widerrufsrecht\n\nSie **müssen** *nichts* tun (\\*) &amp; `nichts` zahlen.\n"
    assert markdown_text(source) == (
        "Widerrufsrecht\n--------------\n\nSie müssen nichts tun (*) & nichts zahlen."
    )


def test_lists_keep_their_markers_and_nesting() -> None:
    source = "- eins\n- zwei\n  - a\n  - b\n\n3. drei\n4. vier\n"
    assert markdown_text(source) == "• eins\n• zwei\n  • a\n  • b\n\n3. drei\n4. vier"


def test_links_show_their_address_once() -> None:
    source = (
        "[Formular](https://broker.example/f), <https://broker.example/x>,"
        " [info@broker.example](mailto:info@broker.example)"
    )
    assert markdown_text(source) == (
        "Formular (https://broker.example/f), https://broker.example/x, info@broker.example"
    )


def test_line_breaks_quotes_rules_and_code_are_kept_readable() -> None:
    source = "# Titel\n\nZeile eins\nZeile zwei\n\n> zitiert\n\n---\n\n    code\n"
    assert markdown_text(source) == (
        f"Titel\n=====\n\nZeile eins\nZeile zwei\n\n    zitiert\n\n{RULE}\n\n    code"
    )


def test_raw_html_is_shown_as_the_text_it_is() -> None:
    assert markdown_text("a <b>fett</b> b") == "a <b>fett</b> b"
