"""Bounces: RFC 3464 delivery status notifications for the agent.

When a copy cannot be delivered (a permanent 5xx from upstream, or temporary failures past the
queue lifetime) the agent gets one DSN, from the null sender ``<>`` to the envelope sender,
listing only the recipients that failed. It is a ``multipart/report`` (RFC 6522) with

1. a ``text/plain`` explanation in the agent's language, rendered from
   ``gateway/texts/templates/dsn/{language}.txt.j2`` (the wording is the broker's to change),
2. the ``message/delivery-status`` part for software,
3. ``text/rfc822-headers``: the original header block, byte for byte.

The MIME structure is concatenated from bytes (gateway/mail/own_mail.py) rather than generated
with ``email``: the agent's header block must be embedded unchanged, and Python's generator
can refold an encoded CR/LF into a real header line (CVE-2024-6923 class). Every value that
reaches a header line comes from our own code or is reduced to a single line first.

The caller must never build a DSN for a message whose own envelope sender was the null
sender ``<>``: a bounce is never bounced (RFC 5321 §4.5.5). ``dsn_mail`` refuses an empty
``envelope_sender`` rather than produce a message nobody can receive.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Final

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    select_autoescape,
)

from gateway.mail.headers import decoded, fields_of, first_value, format_field, header_block
from gateway.mail.own_mail import (
    OwnMail,
    crlf_lines,
    is_hostname,
    multipart,
    one_line,
    plain_part,
    text_part,
)
from gateway.texts.catalog import DEFAULT_TIMEZONE, shipped_catalogs
from gateway.texts.files import TEMPLATES
from rules.language import HOME_LANGUAGE, shipped_language

__all__ = ["FailedRecipient", "dsn_mail"]

TEMPLATE_DIR: Final = TEMPLATES / "dsn"
CRLF: Final = b"\r\n"

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_MESSAGE_ID = re.compile(r"^<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>$")
_REMOTE_MTA_JUNK = re.compile(r"[^A-Za-z0-9.:\[\]-]")
_SMTP_REPLY = re.compile(r"^[245][0-9][0-9](?:[ -]|$)")

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


def dsn_mail(
    *,
    reporting_mta: str,
    original: bytes,
    envelope_sender: str,
    failed: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
    envelope_id: str | None = None,
    language: str = HOME_LANGUAGE,
    zone: str = DEFAULT_TIMEZONE,
) -> OwnMail:
    """The bounce to the envelope sender, from ``MAILER-DAEMON``; to be sent from ``<>``.

    ``reporting_mta`` is our host name; ``original`` the raw message as the agent sent it;
    ``arrival`` when we accepted it and ``now`` the time of the report (both aware);
    ``envelope_id`` the ENVID parameter, xtext-decoded, if the agent gave one; ``language``
    picks the text template (rules.language.shipped_language: anything we do not ship gets
    English, as no configured default is at hand here);
    ``zone`` is the one the text writes the arrival in (``[branding] timezone``), named.

    Raises ``ValueError`` for input that is ours to get right: a null or multi-line sender, a
    bad host name, no failed recipients, a malformed status code or a naive datetime.
    """
    if not envelope_sender or envelope_sender == "<>":
        raise ValueError("never send a DSN to the null sender <>")
    _check_address(envelope_sender, "envelope sender")
    if not is_hostname(reporting_mta):
        raise ValueError(f"reporting MTA is not a host name: {reporting_mta!r}")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    arrival_utc = _utc(arrival, "arrival")
    views = [_view(r) for r in failed]
    lang = shipped_language(language)
    subject, text = _explanation(
        lang, reporting_mta, envelope_sender, original, views, arrival_utc, _utc(now, "now"), zone
    )
    original_headers = header_block(original)  # never the body: it may be 50 MB
    parts = [
        text_part(text, language=lang, description="Notification"),
        plain_part(
            "message/delivery-status",
            _delivery_status(reporting_mta, envelope_id, arrival_utc, failed, views),
            description="Delivery report",
        ),
        plain_part(
            "text/rfc822-headers",
            crlf_lines(original_headers),
            description="Undelivered message headers",
        ),
    ]
    message_id = first_value(fields_of(original), "message-id")
    replied = message_id if message_id and _MESSAGE_ID.fullmatch(message_id) else None
    return OwnMail(
        to=envelope_sender,
        subject=subject,
        body=multipart("report", parts, label="dsn", params="report-type=delivery-status"),
        display_name="Mail Delivery System",
        local_part="MAILER-DAEMON",
        auto_submitted="auto-replied",
        fields=(("In-Reply-To", replied), ("References", replied)) if replied else (),
    )


def _explanation(
    language: str,
    reporting_mta: str,
    envelope_sender: str,
    original: bytes,
    views: Sequence[_RecipientView],
    arrival: datetime,
    now: datetime,
    zone: str,
) -> tuple[str, str]:
    """The subject and the text for the agent, from the template of ``language``."""
    fields = fields_of(original)
    subject_raw = first_value(fields, "subject")
    date_raw = first_value(fields, "date")
    tried = max(v.last_attempt for v in views) - arrival
    tried_hours = max(1, int(tried.total_seconds() // 3600))
    return _render(
        language,
        reporting_mta=reporting_mta,
        sender=one_line(envelope_sender, 320),
        recipients=views,
        original_subject=one_line(decoded(subject_raw), SUBJECT_LIMIT) if subject_raw else "",
        original_date=one_line(date_raw, 100) if date_raw else "",
        arrival=arrival,
        accepted=shipped_catalogs(zone)[language].moment(arrival),
        now=now,
        expired=any(v.reason == "expired" for v in views),
        tried_days=tried_hours // 24,
        tried_hours=tried_hours,
    )


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


def _ascii_line(text: str, limit: int) -> str:
    """One line of printable ASCII for the machine-readable part."""
    line = one_line(text, limit).replace("…", "...")
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
    if code == "6.7":  # RFC 6531: the address needs SMTPUTF8, which the way lacks
        return "international_address"
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
        diagnostic=one_line(recipient.diagnostic, DIAGNOSTIC_LIMIT),
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
        return _address_field(one_line(orcpt, 500))
    addr_type = _ascii_line(addr_type, 40).replace(" ", "") or "rfc822"
    address = one_line(address, 500)
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
    subject = one_line(str(exported["subject"]), 300)
    return subject, str(module)
