"""The consent PDF: the prospect's declarations as they made them, on a durable medium.

One page or more of A4 in the prospect's language: who offered what to whom, when the letter
went out and when they consented (in `[branding] timezone` and UTC), from which IP address
and browser, then every block they were shown in full with each checkbox and whether they
ticked it, and the SHA-256 of those texts with how to check it. The wording lives in
``gateway/texts/catalogs/consent_pdf/{de,en,es}.toml``.

fpdf2's built-in Helvetica needs no font file, so this works wherever Python runs. Those fonts
cover Windows-1252 only (German, English and Spanish, with „ “ – … €). `[letter] pdf_font`
names a TrueType font whose letters the PDF embeds (DejaVu Sans or Noto Sans covers Polish,
Turkish, Greek, Cyrillic, Hebrew and Arabic names), shaped by HarfBuzz so that right-to-left
text reads so. A letter the font lacks is reduced to its base letter where one exists
(ő -> o) or shown as "?", never an error. The hash is taken over the original texts, not
over what the PDF can show.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from fontTools.ttLib import TTLibError
from fpdf import FPDF, FontFace
from markdown_it import MarkdownIt
from markdown_it.token import Token

from gateway.letters.consent_texts import moment
from gateway.letters.evidence import ConsentRecord, ShownBlock
from gateway.letters.pdf_font import font_files
from gateway.texts.catalog import DEFAULT_TIMEZONE
from gateway.texts.files import load_texts
from rules.language import shipped_language

log = logging.getLogger(__name__)

CORE_FONT = "helvetica"
FAMILY = "body"  # a [letter] pdf_font's name inside the PDF
MONO = "courier"
MARGIN = 20.0  # mm
LINE = 5.0  # mm per line of body text
BODY_SIZE = 10.0
BOX = 3.4  # mm, the side of a drawn checkbox

# Formatting characters that show nothing: dropped whatever the font.
_INVISIBLE = str.maketrans(
    dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad")  # \u00ad: fpdf2 would break there
)
# Typographic characters with a plain equivalent, for a font that lacks them.
_PLAIN = str.maketrans(
    {
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2012": "-",  # figure dash
        "\u2015": "\u2014",  # horizontal bar
        "\u2212": "-",  # minus sign
        "\u2009": " ",  # thin space
        "\u200a": " ",  # hair space
        "\u202f": " ",  # narrow no-break space (French and German typography)
        "\u2007": " ",  # figure space
        "\u2002": " ",
        "\u2003": " ",
        "\u2192": "->",
        "\u2190": "<-",
        "\u2264": "<=",
        "\u2265": ">=",
        "\u2260": "!=",
        "\u2713": "x",
        "\u2714": "x",
        "\u2610": "[ ]",
        "\u2611": "[x]",
        "\u2612": "[x]",
        "\u2605": "*",
        "\u25cf": "\u2022",
        "\u25aa": "\u2022",
        "\u2043": "-",
    }
)
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# -- wording ---------------------------------------------------------------------------------


def pdf_text(text: str, drawn: Callable[[str], bool] | None = None) -> str:
    """``text`` in the letters the font draws (`drawn`; the core fonts' Windows-1252 when
    None): never raises, never drops a line.

    Control characters become spaces, bidi overrides and invisible formatting go, and a
    letter the font lacks takes its plain form (a typographic dash or space), else loses its
    accent, else becomes "?".
    """
    has = drawn or _in_cp1252
    out: list[str] = []
    for char in text.translate(_INVISIBLE):
        if char in _BIDI_CONTROLS:
            continue
        if char in "\t\r\n" or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            out.append(" ")
        elif has(char):
            out.append(char)
        elif (plain := char.translate(_PLAIN)) != char and all(has(c) for c in plain):
            out.append(plain)
        else:
            base = "".join(
                c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
            )
            out.append(base if base and all(has(c) for c in base) else "?")
    return "".join(out)


def _in_cp1252(char: str) -> bool:
    try:
        char.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


# -- Markdown as paragraphs and list items ---------------------------------------------------

# The parser and options the letter uses for its HTML (gateway/letters/blocks.py), so the
# PDF reads each text as the letter and the page show it.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


@dataclass(frozen=True)
class Paragraph:
    """One block of a text; ``marker`` is "•" or "3." on a list item's first paragraph."""

    spans: tuple[tuple[str, str], ...]  # (text, fpdf2 style: "", "B", "I" or "BI")
    marker: str = ""
    level: int = 0  # list nesting
    heading: bool = False
    quote: bool = False


def markdown_paragraphs(text: str) -> list[Paragraph]:
    """The blocks of a Markdown text: headings, paragraphs, list items, quotes, code."""
    paragraphs: list[Paragraph] = []
    lists: list[list[int]] = []  # per open list: [ordered (0/1), next number]
    marker, heading, quote = "", False, 0
    for token in _MARKDOWN.parse(text):
        kind = token.type
        if kind == "bullet_list_open":
            lists.append([0, 0])
        elif kind == "ordered_list_open":
            start = token.attrGet("start")
            lists.append([1, int(start) if isinstance(start, int | str) else 1])
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif kind == "list_item_open" and lists:
            ordered, number = lists[-1]
            marker = f"{number}." if ordered else "\u2022"
            lists[-1][1] += 1
        elif kind == "blockquote_open":
            quote += 1
        elif kind == "blockquote_close":
            quote -= 1
        elif kind == "heading_open":
            heading = True
        elif kind == "heading_close":
            heading = False
        elif kind == "inline":
            spans = _spans(token.children or [], bold=heading)
            if spans:
                paragraphs.append(Paragraph(spans, marker, len(lists), heading, quote > 0))
                marker = ""
        elif kind in ("code_block", "fence"):
            content = token.content.rstrip("\n")
            if content:
                paragraphs.append(Paragraph(((content, ""),), marker, len(lists), False, quote > 0))
                marker = ""
    return paragraphs


def _spans(children: list[Token], *, bold: bool) -> tuple[tuple[str, str], ...]:
    """Inline content as runs of one style; a link shows its address after its text."""
    spans: list[tuple[str, str]] = []
    strong, emphasis = int(bold), 0
    links: list[tuple[str, int]] = []  # (href, where its text starts in spans)

    def add(text: str) -> None:
        style = ("B" if strong else "") + ("I" if emphasis else "")
        if spans and spans[-1][1] == style:
            spans[-1] = (spans[-1][0] + text, style)
        else:
            spans.append((text, style))

    for child in children:
        kind = child.type
        if kind in ("text", "code_inline", "html_inline"):
            add(child.content)
        elif kind == "softbreak":
            add(" ")
        elif kind == "hardbreak":
            add("\n")
        elif kind == "strong_open":
            strong += 1
        elif kind == "strong_close":
            strong -= 1
        elif kind == "em_open":
            emphasis += 1
        elif kind == "em_close":
            emphasis -= 1
        elif kind == "image":
            add(child.content or "")
        elif kind == "link_open":
            href = child.attrGet("href")
            links.append((str(href) if href else "", len("".join(t for t, _ in spans))))
        elif kind == "link_close" and links:
            href, begin = links.pop()
            shown = "".join(t for t, _ in spans)[begin:]
            if href and href.removeprefix("mailto:") != shown:
                add(f" ({href.removeprefix('mailto:')})")
    return tuple((t, style) for t, style in spans if t)


# -- the document ----------------------------------------------------------------------------


class _Pdf(FPDF):
    """A4 with the page number and consent id in every footer, in the core fonts or the
    family of `font`; `shown` puts a text in the letters the current font draws."""

    def __init__(self, page_text: str, consent_id: str, font: Path | None) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self.page_text = page_text
        self.consent_id = consent_id
        # The core fonts' PDF encoding is WinAnsi (cp1252); fpdf2 checks latin-1 by default.
        self.core_fonts_encoding = "cp1252"
        self.family = CORE_FONT
        if font is not None:
            try:
                self._embed(font)
            except (OSError, TTLibError) as exc:
                # a font gone since check-config is no reason to refuse a prospect's consent
                log.error("consent PDF in the built-in fonts: %s cannot be used (%s)", font, exc)

    def _embed(self, font: Path) -> None:
        for style, path in font_files(font).items():
            self.add_font(FAMILY, style, path)
        # HarfBuzz: Arabic letters joined, Hebrew and Arabic right to left (drawn as stored,
        # a name would read backwards)
        self.set_text_shaping(True)
        self.family = FAMILY

    def shown(self, text: str) -> str:
        if self.family == CORE_FONT:
            return pdf_text(text)
        cmap = getattr(self.current_font or self.fonts[FAMILY], "cmap", {})
        return pdf_text(text, lambda char: ord(char) in cmap)

    def footer(self) -> None:
        # "{nb}" is fpdf2's alias for the page count, filled in when the document is closed;
        # shaped, it would keep the width of its four characters
        shaped = self.text_shaping is not None
        self.set_text_shaping(False)
        page = self.page_text.format(page=self.page_no(), pages="{nb}")
        self.set_y(-14)
        self.set_font(self.family, size=8)
        self.set_text_color(110)
        self.cell(0, 5, self.shown(f"{page}  \u00b7  {self.consent_id}"), align="C")
        self.set_text_color(0)
        self.set_text_shaping(shaped)


def render(record: ConsentRecord, zone: str = DEFAULT_TIMEZONE, font: Path | None = None) -> bytes:
    """The consent PDF for ``record``, times in ``zone``, in the core fonts or the family of
    the font file `font`; the same input, the same bytes."""
    language = shipped_language(record.language)
    texts = load_texts("consent_pdf")[language]
    pdf = _Pdf(texts["page"], record.consent_id, font)
    pdf.set_margins(MARGIN, MARGIN, MARGIN)
    pdf.set_auto_page_break(True, margin=MARGIN)
    pdf.set_creation_date(record.given_at.astimezone(UTC))
    pdf.set_lang(language)
    pdf.set_title(pdf.shown(f"{texts['title']}: {record.subject}"))
    pdf.set_author(pdf.shown(record.company))
    pdf.set_subject(pdf.shown(record.subject))
    pdf.set_creator("sealrelay")
    pdf.add_page()

    pdf.set_font(pdf.family, "B", 11)
    pdf.multi_cell(0, 6, pdf.shown(record.company), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(2)
    pdf.set_font(pdf.family, "B", 17)
    pdf.multi_cell(0, 8, pdf.shown(texts["title"]), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(2)
    pdf.set_font(pdf.family, "", BODY_SIZE)
    pdf.multi_cell(0, LINE, pdf.shown(texts["intro"]), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(4)

    _facts(pdf, texts, record, zone)
    pdf.ln(6)

    pdf.set_font(pdf.family, "B", 13)
    pdf.multi_cell(0, 7, pdf.shown(texts["declarations"]), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(2)
    for block in record.blocks:
        _block(pdf, texts, block, block.id in record.checked)

    pdf.ln(4)
    pdf.set_font(pdf.family, "B", BODY_SIZE)
    pdf.multi_cell(
        0, LINE, pdf.shown(texts["texts_hash"]), new_x="LMARGIN", new_y="NEXT", align="L"
    )
    pdf.set_font(MONO, "", 9)
    pdf.multi_cell(0, LINE, record.texts_sha256, new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(3)
    pdf.set_font(pdf.family, "", 9)
    verify = texts["verify"].format(company=record.company, consent_id=record.consent_id)
    pdf.multi_cell(0, 4.5, pdf.shown(verify), new_x="LMARGIN", new_y="NEXT", align="L")
    return bytes(pdf.output())


def _facts(pdf: _Pdf, texts: Mapping[str, str], record: ConsentRecord, zone: str) -> None:
    rows = [
        ("fields.company", record.company),
        ("fields.recipient", record.recipient),
        ("fields.subject", record.subject),
        ("fields.agent", record.agent),
        ("fields.letter_sent", moment(texts, record.letter_sent_at, record.language, zone)),
        ("fields.given", moment(texts, record.given_at, record.language, zone)),
        ("fields.ip", record.ip),
        ("fields.user_agent", record.user_agent),
        ("fields.consent_id", record.consent_id),
    ]
    pdf.set_font(pdf.family, "", 9.5)
    label_style = FontFace(emphasis="BOLD")
    with pdf.table(
        col_widths=(32, 68),
        first_row_as_headings=False,
        borders_layout="HORIZONTAL_LINES",
        text_align="LEFT",
        v_align="TOP",
        line_height=4.8,
        padding=(1.2, 1.5),
    ) as table:
        for key, value in rows:
            row = table.row()
            row.cell(pdf.shown(texts[key]), style=label_style)
            row.cell(pdf.shown(value) or "-")


def _block(pdf: _Pdf, texts: Mapping[str, str], block: ShownBlock, ticked: bool) -> None:
    if pdf.will_page_break(4 * LINE):
        pdf.add_page()
    pdf.set_font(pdf.family, "B", 11.5)
    pdf.multi_cell(0, 6, pdf.shown(block.title), new_x="LMARGIN", new_y="NEXT", align="L")
    pdf.ln(1)
    for paragraph in markdown_paragraphs(block.text):
        _paragraph(pdf, paragraph)
    if block.checkbox is not None:
        _checkbox(pdf, texts, block.checkbox, ticked)
    pdf.ln(3)


def _paragraph(pdf: _Pdf, paragraph: Paragraph) -> None:
    indent = 7.0 * paragraph.level + (5.0 if paragraph.quote else 0.0)
    left = MARGIN + indent
    if paragraph.marker:
        pdf.set_font(pdf.family, "", BODY_SIZE)
        pdf.set_x(left - 6.0)
        pdf.write(LINE, paragraph.marker)
    pdf.set_left_margin(left)
    pdf.set_x(left)
    for text, style in paragraph.spans:
        pdf.set_font(pdf.family, style, BODY_SIZE)
        # a hard line break stays one: shown() makes a line end a space
        pdf.write(LINE, "\n".join(pdf.shown(line) for line in text.split("\n")))
    pdf.ln(LINE)
    pdf.set_left_margin(MARGIN)
    pdf.set_x(MARGIN)
    pdf.ln(1.0 if paragraph.level else 1.8)


def _checkbox(pdf: _Pdf, texts: Mapping[str, str], label: str, ticked: bool) -> None:
    if pdf.will_page_break(2 * LINE):
        pdf.add_page()
    pdf.ln(0.5)
    x, y = MARGIN, pdf.get_y() + (LINE - BOX) / 2
    pdf.set_line_width(0.3)
    pdf.rect(x, y, BOX, BOX)
    if ticked:
        pdf.line(x + 0.6, y + 0.6, x + BOX - 0.6, y + BOX - 0.6)
        pdf.line(x + 0.6, y + BOX - 0.6, x + BOX - 0.6, y + 0.6)
    pdf.set_line_width(0.2)
    left = MARGIN + BOX + 2.5
    pdf.set_left_margin(left)
    pdf.set_x(left)
    pdf.set_font(pdf.family, "B", BODY_SIZE)
    pdf.write(LINE, pdf.shown(texts["ticked" if ticked else "not_ticked"]) + ": ")
    pdf.set_font(pdf.family, "", BODY_SIZE)
    pdf.write(LINE, pdf.shown(label))  # labels are plain text, as the letter shows them
    pdf.ln(LINE)
    pdf.set_left_margin(MARGIN)
    pdf.set_x(MARGIN)
