"""Bounces: RFC 3464 delivery status notifications for the agent.

When a copy cannot be delivered (a permanent 5xx from upstream, or temporary failures past the
queue lifetime) the agent gets one DSN, from the null sender ``<>`` to the envelope sender,
listing only the recipients that failed. It is a ``multipart/report`` (RFC 6522) with

1. a ``text/plain`` explanation in the agent's language, rendered from
   ``gateway/templates/dsn/{language}.txt.j2`` (the wording is the broker's to change),
2. the ``message/delivery-status`` part for software,
3. ``text/rfc822-headers``: the original header block, byte for byte.

The MIME structure is concatenated from bytes here rather than generated with ``email``: the
agent's header block must be embedded unchanged, and Python's generator can refold an encoded
CR/LF into a real header line (CVE-2024-6923 class). Every value that reaches a header line
comes from our own code or is reduced to a single line first.

The caller must never build a DSN for a message whose own envelope sender was the null
sender ``<>``: a bounce is never bounced (RFC 5321 §4.5.5). ``build_dsn`` refuses an empty
``envelope_sender`` rather than produce a message nobody can receive.
"""

from __future__ import annotations

import binascii
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime
from functools import lru_cache
from typing import Final

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    select_autoescape,
)

from gateway.headers import decoded, fields_of, first_value, format_field, split_message
from gateway.i18n import DEFAULT_TIMEZONE, shipped_catalogs
from gateway.mime import join_multipart
from gateway.text_files import TEMPLATES
from rules.language import HOME_LANGUAGE, shipped_language

__all__ = ["FailedRecipient", "build_dsn"]

TEMPLATE_DIR: Final = TEMPLATES / "dsn"
CRLF: Final = b"\r\n"

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_MESSAGE_ID = re.compile(r"^<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>$")
_REMOTE_MTA_JUNK = re.compile(r"[^A-Za-z0-9.:\[\]-]")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_SMTP_REPLY = re.compile(r"^[245][0-9][0-9](?:[ -]|$)")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

SUBJECT_LIMIT: Final = 200
DIAGNOSTIC_LIMIT: Final = 900
# RFC 3464 §2.3.6: "smtp" is for a reply an SMTP server sent; our own texts (an expired
# message) get a private type, as Postfix writes "X-Postfix; ...".
DIAGNOSTIC_TYPE_OWN: Final = "X-Sealrelay"


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the DSN reports as failed.

    ``diagnostic`` is the remote reply without the diagnostic type ("550 5.1.1 no such user";
    ``smtp; `` is prefixed here), or our own sentence for an expired message (written with the
    type ``X-Sealrelay; `` as it is no SMTP reply). It may come from a remote server: line
    breaks and control characters are removed before it is written.
    ``original_recipient`` is the ORCPT parameter of the agent's RCPT command, xtext-decoded
    ("rfc822;alias@example.org"); RFC 3461 §6.3 (d) allows the Original-Recipient field only
    when it was given.
    """

    address: str
    status: str
    diagnostic: str
    last_attempt: datetime
    remote_mta: str | None
    original_recipient: str | None = None


@dataclass(frozen=True)
class _RecipientView:
    """What the text template sees of one failed recipient; every string is one line."""

    address: str
    status: str
    reason: str
    diagnostic: str
    remote_mta: str | None
    last_attempt: datetime


def build_dsn(
    *,
    reporting_mta: str,
    original: bytes,
    envelope_sender: str,
    failed: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
    envelope_id: str | None = None,
    language: str = HOME_LANGUAGE,
    sender: str | None = None,
    zone: str = DEFAULT_TIMEZONE,
) -> bytes:
    """The complete bounce message (CRLF line ends), to be sent from ``<>`` to the sender.

    ``reporting_mta`` is our host name; ``original`` the raw message as the agent sent it;
    ``arrival`` when we accepted it and ``now`` the time of the report (both aware);
    ``envelope_id`` the ENVID parameter, xtext-decoded, if the agent gave one; ``language``
    picks the text template (rules.language.shipped_language: anything we do not ship gets
    English, as no configured default is at hand here);
    ``sender`` the From address (``MAILER-DAEMON@reporting_mta`` by default), in a domain
    that signs when there is one (gateway.local_mail.own_sender).
    ``zone`` is the one the text writes the arrival in (``[branding] timezone``), named.

    Raises ``ValueError`` for input that is ours to get right: a null or multi-line sender, a
    bad host name, no failed recipients, a malformed status code or a naive datetime.
    """
    if not envelope_sender or envelope_sender == "<>":
        raise ValueError("never send a DSN to the null sender <>")
    _check_address(envelope_sender, "envelope sender")
    if sender is not None:
        _check_address(sender, "sender")
    if not _HOSTNAME.fullmatch(reporting_mta):
        raise ValueError(f"reporting MTA is not a host name: {reporting_mta!r}")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    arrival_utc = _utc(arrival, "arrival")
    now_utc = _utc(now, "now")
    views = [_view(r) for r in failed]

    header_block, _ = split_message(original)
    fields = fields_of(original)
    subject_raw = first_value(fields, "subject")
    original_subject = _one_line(decoded(subject_raw), SUBJECT_LIMIT) if subject_raw else ""
    date_raw = first_value(fields, "date")
    original_date = _one_line(date_raw, 100) if date_raw else ""
    message_id = first_value(fields, "message-id")

    lang = shipped_language(language)
    tried = max(v.last_attempt for v in views) - arrival_utc
    tried_hours = max(1, int(tried.total_seconds() // 3600))
    subject, text = _render(
        lang,
        reporting_mta=reporting_mta,
        sender=_one_line(envelope_sender, 320),
        recipients=views,
        original_subject=original_subject,
        original_date=original_date,
        arrival=arrival_utc,
        accepted=shipped_catalogs(zone)[lang].moment(arrival_utc),
        now=now_utc,
        expired=any(v.reason == "expired" for v in views),
        tried_days=tried_hours // 24,
        tried_hours=tried_hours,
    )

    human = _quoted_printable(text)
    status = _delivery_status(reporting_mta, envelope_id, arrival_utc, failed, views)
    embedded = _crlf_lines(header_block)
    boundary = _boundary(original, human, status, embedded)

    head = [
        format_field(
            "From", f"Mail Delivery System <{sender or f'MAILER-DAEMON@{reporting_mta}'}>"
        ),
        format_field("To", f"<{envelope_sender}>"),
        format_field("Subject", _encoded_subject(subject)),
        format_field("Date", format_datetime(now_utc)),
        format_field("Message-ID", f"<{secrets.token_hex(16)}@{reporting_mta}>"),
    ]
    if message_id and _MESSAGE_ID.fullmatch(message_id):
        head.append(format_field("In-Reply-To", message_id))
        head.append(format_field("References", message_id))
    head += [
        format_field("Auto-Submitted", "auto-replied"),
        format_field("MIME-Version", "1.0"),
        format_field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
    ]
    parts = [
        (
            [
                format_field("Content-Type", "text/plain; charset=utf-8"),
                format_field("Content-Transfer-Encoding", "quoted-printable"),
                format_field("Content-Language", lang),
                format_field("Content-Description", "Notification"),
            ],
            human,
        ),
        (
            [
                format_field("Content-Type", "message/delivery-status"),
                format_field("Content-Description", "Delivery report"),
            ],
            status,
        ),
        (
            [
                format_field("Content-Type", "text/rfc822-headers"),
                format_field("Content-Transfer-Encoding", "7bit" if embedded.isascii() else "8bit"),
                format_field("Content-Description", "Undelivered message headers"),
            ],
            embedded,
        ),
    ]
    return join_multipart(head, boundary, parts)


# -- values ----------------------------------------------------------------------------------


def _utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime")
    return moment.astimezone(UTC)


def _check_address(address: str, what: str) -> None:
    """Envelope addresses are ours (parsed from MAIL/RCPT): refuse, rather than clean, one that
    could break a line or the angle brackets around it."""
    unusable = any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in "<>" for c in address)
    if not address or unusable or len(address) > 500:
        raise ValueError(f"{what} is not a usable address: {address!r}")


def _one_line(text: str, limit: int) -> str:
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


def _ascii_line(text: str, limit: int) -> str:
    """One line of printable ASCII for the machine-readable part."""
    line = _one_line(text, limit).replace("…", "...")
    return "".join(c if " " <= c <= "~" else "?" for c in line)


def _reason(status: str) -> str:
    """A coarse reason the template can explain to someone who is not technical."""
    match = _STATUS.fullmatch(status)
    if match is None:
        raise ValueError(f"not an enhanced status code: {status!r}")
    klass, subject, detail = match.groups()
    code = f"{subject}.{detail}"
    if klass == "4" or code == "4.7":
        return "expired"
    if code in ("1.2", "1.10"):
        return "unknown_domain"
    if subject == "1" or code == "2.1":
        return "unknown_address"
    if code == "2.2":
        return "mailbox_full"
    if code in ("2.3", "3.4"):
        return "too_big"
    if subject == "7":
        return "rejected"
    return "other"


def _view(recipient: FailedRecipient) -> _RecipientView:
    _check_address(recipient.address, "failed recipient")
    if not _STATUS.fullmatch(recipient.status) or recipient.status.startswith("2"):
        raise ValueError(f"not a failure status code: {recipient.status!r}")
    remote = _REMOTE_MTA_JUNK.sub("", recipient.remote_mta or "")[:255] or None
    return _RecipientView(
        address=recipient.address,
        status=recipient.status,
        reason=_reason(recipient.status),
        diagnostic=_one_line(recipient.diagnostic, DIAGNOSTIC_LIMIT),
        remote_mta=remote,
        last_attempt=_utc(recipient.last_attempt, "last_attempt"),
    )


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; `` with xtext escapes for an SMTPUTF8 address."""
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _original_recipient_field(orcpt: str) -> str:
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        return _address_field(_one_line(orcpt, 500))
    addr_type = _ascii_line(addr_type, 40).replace(" ", "") or "rfc822"
    address = _one_line(address, 500)
    if not address.isascii():
        return _address_field(address)
    return f"{addr_type}; {address}"


# -- parts -----------------------------------------------------------------------------------


def _delivery_status(
    reporting_mta: str,
    envelope_id: str | None,
    arrival: datetime,
    failed: Sequence[FailedRecipient],
    views: Sequence[_RecipientView],
) -> bytes:
    """The ``message/delivery-status`` body: per-message fields, then one block per recipient.

    Every field goes through ``format_field``, which folds long values and refuses line
    breaks; remote text is reduced to one line of printable ASCII before it gets there.
    """
    lines = [format_field("Reporting-MTA", f"dns; {reporting_mta}")]
    if envelope_id is not None and (envid := _ascii_line(envelope_id, 100)):
        lines.append(format_field("Original-Envelope-Id", envid))
    lines.append(format_field("Arrival-Date", format_datetime(arrival)))
    for recipient, view in zip(failed, views, strict=True):
        lines.append(CRLF)
        if recipient.original_recipient:
            orcpt = _original_recipient_field(recipient.original_recipient)
            lines.append(format_field("Original-Recipient", orcpt))
        lines.append(format_field("Final-Recipient", _address_field(view.address)))
        lines.append(format_field("Action", "failed"))
        lines.append(format_field("Status", view.status))
        if view.remote_mta:
            lines.append(format_field("Remote-MTA", f"dns; {view.remote_mta}"))
        diagnostic = _ascii_line(recipient.diagnostic, DIAGNOSTIC_LIMIT)
        if diagnostic:
            kind = "smtp" if _SMTP_REPLY.match(diagnostic) else DIAGNOSTIC_TYPE_OWN
            lines.append(format_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
        lines.append(format_field("Last-Attempt-Date", format_datetime(view.last_attempt)))
    return b"".join(lines)


def _crlf_lines(header_block: bytes) -> bytes:
    """The original header block with every line end as CRLF and a final one.

    For mail that arrived over SMTP (CRLF already) this is the block byte for byte; a stray
    bare CR or LF would otherwise travel on into our own outgoing message.
    """
    if not header_block:
        return b""
    block = _LINE_END.sub(CRLF, header_block)
    return block if block.endswith(CRLF) else block + CRLF


def _quoted_printable(text: str) -> bytes:
    """UTF-8 text as quoted-printable with CRLF line ends: safe over 7-bit upstreams."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    encoded = [binascii.b2a_qp(line.encode("utf-8"), istext=False) for line in lines]
    # A soft line break inside one line comes out as "=\n": make it "=\r\n".
    return b"".join(_LINE_END.sub(CRLF, line) + CRLF for line in encoded)


def _boundary(*contents: bytes) -> str:
    """A random boundary that occurs in none of the parts (nor the whole original)."""
    haystack = b"".join(contents).lower()
    while True:
        boundary = f"=_sealrelay_dsn_{secrets.token_hex(12)}"
        if boundary.lower().encode("ascii") not in haystack:
            return boundary


def _encoded_subject(subject: str) -> str:
    """A Subject value that is all ASCII: RFC 2047 encoded words where needed.

    The encoded words come back separated by spaces so ``format_field`` can fold between
    them; white space between adjacent encoded words is ignored when they are decoded.
    """
    if subject.isascii() and "=?" not in subject:
        return subject
    encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\n")
    return " ".join(encoded.split())


# -- texts -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        # Plain-text mail: nothing here is HTML, and no value reaches a header line.
        autoescape=select_autoescape(enabled_extensions=("html", "htm"), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(language: str, **context: object) -> tuple[str, str]:
    """The subject (the template's ``{% set subject %}``) and the body text."""
    module = _environment().get_template(f"{language}.txt.j2").make_module(context)
    exported = vars(module)
    if "subject" not in exported:
        raise ValueError(f"DSN template {language!r} sets no subject")
    subject = _one_line(str(exported["subject"]), 300)
    return subject, str(module)
