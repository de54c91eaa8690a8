"""The files of a font family for the consent PDF, found from its regular file.

IT names one file (`[letter] pdf_font`); its bold and italic siblings are found beside it by
the names the common families give them: DejaVu (`DejaVuSans-Bold.ttf`,
`DejaVuSans-Oblique.ttf`), Noto and Liberation (`NotoSans-Regular.ttf`, `-Bold`, `-Italic`,
`-BoldItalic`). Apart from consent_pdf so that checking the config does not load fpdf2.
"""

from __future__ import annotations

from pathlib import Path

# The first bytes of a TrueType (1.0 or Apple's "true") or an OpenType (CFF) font file, or
# of a collection (Noto CJK's .ttc), whose first font is used.
_FONT_MAGIC = (b"\x00\x01\x00\x00", b"true", b"OTTO", b"ttcf")
_SIBLINGS = {
    "B": ("-Bold",),
    "I": ("-Italic", "-Oblique"),
    "BI": ("-BoldItalic", "-BoldOblique"),
}
STYLE_NAMES = {"B": "bold", "I": "italic", "BI": "bold italic"}


def font_files(regular: Path) -> dict[str, Path]:
    """The family's file per fpdf2 style ("", "B", "I", "BI"); a style without its own file
    is drawn with the regular one (the words stay, the emphasis goes)."""
    stem = regular.stem.removesuffix("-Regular")
    files = {"": regular}
    for style, suffixes in _SIBLINGS.items():
        found = (regular.with_name(f"{stem}{s}{regular.suffix}") for s in suffixes)
        files[style] = next((path for path in found if path.is_file()), regular)
    return files


def font_problem(path: Path) -> str | None:
    """Why `path` is no font file the PDF can use, or None."""
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if magic not in _FONT_MAGIC:
        return f"{path} is not a TrueType or OpenType font (.ttf, .otf, .ttc)"
    return None
