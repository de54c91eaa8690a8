"""The MIME of every mail the relay writes itself: bounces, letters, confirmations, notices.

Concatenated as CRLF bytes rather than generated with ``email``: Python's generator can refold
an encoded CR/LF into a real header line (CVE-2024-6923 class), and a bounce must embed the
agent's header block unchanged. So every header value goes through ``headers.format_field``
(which refuses line breaks), a value that came from someone else is first reduced to one line
(``one_line``), subjects become RFC 2047 encoded words, text is UTF-8 quoted-printable and
binary data base64: the result is 7-bit mail with CRLF line ends, safe over any upstream.

A kind of mail says only what it is about (an ``OwnMail``: its addressee, subject and body
parts); ``render`` writes the same head for all of them. The registered letter, which carries
the agent's own From, builds its head itself and shares the rest (``message``).
"""

from __future__ import annotations

import binascii
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime
from typing import Final

from gateway.mail import mime
from gateway.mail.headers import format_field

CRLF: Final = b"\r\n"
ADDRESS_LIMIT: Final = 320
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_FILENAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Part:
    """One MIME entity of our own: its content fields (CRLF-terminated) and encoded body."""

    fields: tuple[bytes, ...]
    body: bytes


@dataclass(frozen=True)
class OwnMail:
    """What one kind of the relay's mail says; everything else is the same for every kind.

    ``to`` is the agent's address; ``about`` the id of what the mail concerns (a consent, a
    letter) for its Message-ID; ``fields`` extra header fields (name, value) such as
    In-Reply-To; ``local_part`` of the From address (``[server] own_mail_sender`` if None).
    """

    to: str
    subject: str
    body: Part
    display_name: str = "sealrelay"
    local_part: str | None = None
    about: str | None = None
    auto_submitted: str = "auto-generated"
    fields: tuple[tuple[str, str], ...] = ()


# -- values ----------------------------------------------------------------------------------


def one_line(text: str, limit: int) -> str:
    """Text that cannot start a new line anywhere: controls and line separators become spaces,
    white space is collapsed, bidi overrides go, and it is cut to ``limit`` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    cleaned = []
    for char in text:
        if char in _BIDI_CONTROLS:
            continue
        category = unicodedata.category(char)
        cleaned.append(" " if category in ("Cc", "Zl", "Zp") or char.isspace() else char)
    single = " ".join("".join(cleaned).split())
    return single if len(single) <= limit else single[: limit - 1].rstrip() + "…"


def encoded_words(text: str) -> str:
    """All ASCII: RFC 2047 encoded words where needed, space-separated so format_field can
    fold between them (white space between encoded words is dropped when they are decoded).
    An ASCII text holding ``=?`` is encoded too, so it is never read as an encoded word. The
    words use only what RFC 2047 allows in a phrase, so a display name may be one."""
    if text.isascii() and "=?" not in text:
        return text
    encoded = Header(text, "utf-8", header_name="Subject").encode(linesep="\n")
    return " ".join(encoded.split())


def named_address(name: str, address: str) -> str:
    """`Name <address>` for a To field, the name taken from someone else's header: one line,
    encoded words when it is not ASCII, a quoted string when it holds a special character
    (RFC 5322 3.2.3); `<address>` alone when there is no name."""
    name = one_line(name, 200)
    if not name:
        return f"<{address}>"
    if not name.isascii() or "=?" in name:
        return f"{encoded_words(name)} <{address}>"
    if _SPECIALS.search(name):
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    return f"{name} <{address}>"


def console_url(public_url: str, message_id: str) -> str:
    """The console's page of the message (every event per recipient, and the agent's
    actions: resend a letter, extend or end links)."""
    return f"{public_url.rstrip('/')}/console/messages/{message_id}"


def account_url(public_url: str) -> str:
    """The console's "My account" page, where each user chooses the optional notices."""
    return f"{public_url.rstrip('/')}/console/account"


def message_id(hostname: str, about: str | None = None) -> str:
    """A fresh Message-ID in our host's name, led by the id of what the mail is about."""
    if about is None:
        return f"<{secrets.token_hex(16)}@{hostname}>"
    return f"<{about}.{secrets.token_hex(8)}@{hostname}>"


def is_hostname(text: str) -> bool:
    return _HOSTNAME.fullmatch(text) is not None


# -- bodies ----------------------------------------------------------------------------------


def quoted_printable(text: str) -> bytes:
    """UTF-8 text as quoted-printable with CRLF line ends: safe over 7-bit upstreams."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    encoded = [binascii.b2a_qp(line.encode("utf-8"), istext=False) for line in lines]
    # A soft line break inside one line comes out as "=\n": make it "=\r\n".
    return b"".join(_LINE_END.sub(CRLF, line) + CRLF for line in encoded)


def crlf_lines(data: bytes) -> bytes:
    """Every line end as CRLF and a final one (nothing for nothing)."""
    if not data:
        return b""
    lines = _LINE_END.sub(CRLF, data)
    return lines if lines.endswith(CRLF) else lines + CRLF


# -- parts -----------------------------------------------------------------------------------


def text_part(
    text: str, *, subtype: str = "plain", language: str | None = None, description: str = ""
) -> Part:
    """Text as UTF-8 quoted-printable, its language and purpose named when given."""
    fields = [
        format_field("Content-Type", f"text/{subtype}; charset=utf-8"),
        format_field("Content-Transfer-Encoding", "quoted-printable"),
    ]
    if language:
        fields.append(format_field("Content-Language", language))
    if description:
        fields.append(format_field("Content-Description", description))
    return Part(tuple(fields), quoted_printable(text))


def attachment(data: bytes, content_type: str, filename: str) -> Part:
    """A base64 attachment; the name is ours, plain ASCII without spaces, so never encoded."""
    if not _FILENAME.fullmatch(filename):
        raise ValueError(f"attachment name {filename!r} must be plain ASCII without spaces")
    fields = (
        format_field("Content-Type", f'{content_type}; name="{filename}"'),
        format_field("Content-Transfer-Encoding", "base64"),
        format_field("Content-Disposition", f'attachment; filename="{filename}"'),
    )
    return Part(fields, mime.base64_lines(data))


def plain_part(content_type: str, body: bytes, *, description: str = "") -> Part:
    """A part whose body is already CRLF lines (a report, an embedded header block)."""
    fields = [format_field("Content-Type", content_type)]
    if content_type.startswith("text/"):
        encoding = "7bit" if body.isascii() else "8bit"
        fields.append(format_field("Content-Transfer-Encoding", encoding))
    if description:
        fields.append(format_field("Content-Description", description))
    return Part(tuple(fields), body)


def multipart(subtype: str, parts: Sequence[Part], *, label: str, params: str = "") -> Part:
    """Parts joined under a fresh boundary (``=_sealrelay_<label>_...``) none of them holds."""
    boundary = _boundary(label, [b"".join(p.fields) + p.body for p in parts])
    content_type = "; ".join(
        [f"multipart/{subtype}", *([params] if params else []), f'boundary="{boundary}"']
    )
    delimiter = b"--" + boundary.encode("ascii")
    body: list[bytes] = []
    for part in parts:
        body += [delimiter, CRLF, *part.fields, CRLF, part.body, CRLF]
    body += [delimiter, b"--", CRLF]
    return Part((format_field("Content-Type", content_type),), b"".join(body))


def _boundary(label: str, contents: Sequence[bytes]) -> str:
    haystack = b"".join(contents).lower()
    while True:
        boundary = f"=_sealrelay_{label}_{secrets.token_hex(12)}"
        if boundary.lower().encode("ascii") not in haystack:
            return boundary


# -- whole messages --------------------------------------------------------------------------


def message(head: Sequence[bytes], body: Part) -> bytes:
    """Header fields, then the body part's own fields under MIME-Version, then its body."""
    fields = [*head, format_field("MIME-Version", "1.0"), *body.fields]
    return b"".join(fields) + CRLF + body.body


def render(mail: OwnMail, *, sender: str, hostname: str, now: datetime) -> bytes:
    """The complete mail (CRLF line ends) from ``sender``, in the name of ``hostname``, dated
    ``now``. It says it was written by a machine, so no mailbox answers it automatically."""
    if not is_hostname(hostname):  # ours to get right: refused, not cleaned
        raise ValueError(f"not a host name: {hostname!r}")
    head = [
        format_field("From", f"{mail.display_name} <{one_line(sender, ADDRESS_LIMIT)}>"),
        format_field("To", one_line(mail.to, ADDRESS_LIMIT)),
        format_field("Subject", encoded_words(mail.subject)),
        format_field("Date", format_datetime(now)),
        format_field("Message-ID", message_id(hostname, mail.about)),
        *(format_field(name, value) for name, value in mail.fields),
        format_field("Auto-Submitted", mail.auto_submitted),
        format_field("X-Auto-Response-Suppress", "All"),
    ]
    return message(head, mail.body)
