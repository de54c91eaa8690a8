"""Markdown as readable plain text, for the text/plain part of the relay's own mail.

A reader of the plain part must not see Markdown syntax (``### Widerrufsrecht``,
``**…**``, ``\\*``): headings are underlined, emphasis is dropped, lists keep a marker,
links show their address, escapes and entities are resolved. It walks markdown-it's syntax
tree (the same parser that writes the HTML part), so both parts read the source alike.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

_parser = MarkdownIt("commonmark", {"html": False})
BULLET = "•"
RULE = "-" * 40

Lines = list[str]


def markdown_text(source: str) -> str:
    """The source rendered as plain text: blocks separated by one blank line, no trailing
    white space."""
    tree = SyntaxTreeNode(_parser.parse(source))
    return "\n".join(_joined(_blocks(tree.children), loose=True)).strip("\n")


def _blocks(nodes: list[SyntaxTreeNode]) -> list[Lines]:
    return [lines for node in nodes if (lines := _block(node))]


def _block(node: SyntaxTreeNode) -> Lines:
    kind = node.type
    if kind == "paragraph":
        return _inline(node).split("\n")
    if kind == "heading":
        text = _inline(node)
        underline = "=" if node.tag in ("h1", "h2") else "-"
        return [text, underline * len(text)]
    if kind in ("bullet_list", "ordered_list"):
        return _list(node)
    if kind == "blockquote":
        return ["    " + line if line else "" for line in _joined(_blocks(node.children), True)]
    if kind == "hr":
        return [RULE]
    if kind in ("code_block", "fence", "html_block"):
        return ["    " + line for line in node.content.rstrip("\n").split("\n")]
    return _joined(_blocks(node.children), loose=True)


def _list(node: SyntaxTreeNode) -> Lines:
    ordered = node.type == "ordered_list"
    start = int(node.attrs.get("start", 1)) if ordered else 1
    loose = any(
        child.type == "paragraph" and not child.hidden
        for item in node.children
        for child in item.children
    )
    lines: Lines = []
    for number, item in enumerate(node.children, start):
        marker = f"{number}. " if ordered else f"{BULLET} "
        body = _joined(_blocks(item.children), loose) or [""]
        indent = " " * len(marker)
        if lines and loose:
            lines.append("")
        lines.append(marker + body[0])
        lines.extend(indent + line if line else "" for line in body[1:])
    return lines


def _joined(blocks: list[Lines], loose: bool) -> Lines:
    """Blocks one after another, with a blank line between them when `loose`."""
    lines: Lines = []
    for block in blocks:
        if lines and loose:
            lines.append("")
        lines.extend(block)
    return lines


def _inline(node: SyntaxTreeNode) -> str:
    """The visible text of a paragraph or heading: markers gone, link targets in brackets."""
    parts: list[str] = []
    for inline in node.children:
        for child in inline.children:
            parts.append(_span(child))
    return "".join(parts).strip()


def _span(node: SyntaxTreeNode) -> str:
    kind = node.type
    if kind in ("text", "code_inline", "html_inline"):
        return node.content
    if kind == "softbreak" or kind == "hardbreak":
        return "\n"
    text = "".join(_span(child) for child in node.children)
    if kind == "link":
        target = str(node.attrs.get("href", ""))
        shown = target.removeprefix("mailto:")
        if not target or text in (target, shown):
            return text
        return f"{text} ({shown})" if text else shown
    return text
