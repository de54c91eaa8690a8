"""The short block that replaces linked attachments in a recipient's text and HTML body."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import jinja2

from gateway.mail import headers
from gateway.store.models import StoredFile
from gateway.texts.catalog import DEFAULT_TIMEZONE, shipped_catalogs
from gateway.texts.files import TEMPLATES

_TEMPLATES = TEMPLATES / "linkblock"
_text = jinja2.Environment(
    # Plain text for a text/plain body: HTML escaping would corrupt names like "A & B".
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=False,  # noqa: S701
    keep_trailing_newline=True,
)
_html = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True)


def render(
    language: str,
    url: str,
    files: Sequence[StoredFile],
    expires_at: datetime,
    color: str,
    zone: str = DEFAULT_TIMEZONE,
) -> tuple[str, str]:
    """Text and HTML block in the recipient's language, every line ending in CRLF; the expiry
    in `zone`, named."""
    catalog = shipped_catalogs(zone)[language]
    context = {
        "url": url,
        "count": len(files),
        "expires": catalog.moment(expires_at),
        "color": color,
        "files": [
            {"name": headers.controls_blanked(f.filename), "size": catalog.size(f.size)}
            for f in files
        ],
    }
    text = _text.get_template(f"{language}.txt.j2").render(context)
    html = _html.get_template(f"{language}.html.j2").render(context)
    return _crlf(text), _crlf(html)


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
