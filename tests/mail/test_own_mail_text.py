"""The plain text of the relay's own mail is not hard-wrapped, so it reads well on a phone.

A paragraph broken at 72 columns stays broken where the screen is narrower: every other line
ends half-way. Written as one line, every mail client wraps it to the screen (quoted-printable
keeps the lines on the wire short). So every paragraph and list item of the bounce, the
confirmation, the renewal request and the expiry notice is one line; the registered letter's
text carries the agent's signature lines and is left out of this check.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest

from gateway.outbound.dsn import FailedRecipient, dsn_mail
from tests.mail.test_golden_mails import GOLDEN, LANGUAGES, OFFER_HEADER

NOW = datetime(2026, 11, 23, 14, 5, 9, tzinfo=UTC)
# what may stand alone on a line before another: a "Label: value" line, a list item that is
# one word (an address), a tick box, a line without letters (a rule, the signature dashes)
_LABEL = re.compile(r"^\s*[^\s:][^:]{0,30}:(\s|$)")
_ONE_WORD_ITEM = re.compile(r"^\s*[-*] \S+$")
_BOX = re.compile(r"^\s*[☒☐]")


def wrapped_lines(text: str) -> list[str]:
    """Lines that end inside a sentence and go on in the line after them."""
    lines = text.splitlines()
    found = []
    for line, following in itertools.pairwise(lines):
        if not line.strip() or not following.strip():
            continue
        if line.rstrip()[-1] in ".:!?" or not re.search(r"[^\W\d_]", line):
            continue
        if _LABEL.match(line) or _ONE_WORD_ITEM.match(line) or _BOX.match(line):
            continue
        found.append(line)
    return found


def plain_text(raw: bytes) -> str:
    """The text/plain body part a mail client shows."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    body = message.get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


def test_the_check_finds_a_hard_wrapped_paragraph() -> None:
    assert wrapped_lines("Hello,\n\nThe following recipient could not\nbe reached.\n") == [
        "The following recipient could not"
    ]
    assert wrapped_lines("  - Send it again to\n    the right address.\n") == [
        "  - Send it again to"
    ]
    listed = "Your message:\n  Subject:  Villa\n  Date:  Mon\n\n  * a@b.example\n  Gone.\n"
    assert wrapped_lines(listed) == []


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("mail", ["dsn", "confirmation", "renewal", "expiry-notice"])
def test_golden_mails_have_no_hard_wrapped_paragraphs(mail: str, language: str) -> None:
    raw = (GOLDEN / f"{mail}-{language}.eml").read_bytes()
    text = plain_text(raw)
    assert wrapped_lines(text) == []


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_reason_a_bounce_gives_is_one_line(language: str) -> None:
    statuses = ["5.1.1", "5.1.2", "5.2.2", "5.3.4", "5.7.1", "4.4.7", "5.0.0"]
    failed = [
        FailedRecipient(
            address=f"r{number}@example.org",
            status=status,
            diagnostic=f"{status} the server's own words",
            last_attempt=NOW,
            remote_mta=None,
        )
        for number, status in enumerate(statuses)
    ]
    mail = dsn_mail(
        reporting_mta="relay.broker.example",
        original=OFFER_HEADER,
        envelope_sender="anna.agent@broker.example",
        failed=failed,
        arrival=NOW - timedelta(hours=30),
        now=NOW,
        language=language,
    )
    text = plain_text(b"".join(mail.body.fields) + b"\r\n" + mail.body.body)
    assert wrapped_lines(text) == []
    assert len(text.splitlines()) > 30  # every reason is there
