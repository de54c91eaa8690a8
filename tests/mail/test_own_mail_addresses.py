"""The registered letter's To names the prospect as the agent's mail did: whatever the name
holds (letters outside ASCII, commas, quotes, line breaks), a mail client reads back that
name and that address, and nothing else."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest

from gateway.mail.headers import format_field
from gateway.mail.own_mail import named_address


def read_back(value: str) -> tuple[str, str, int]:
    """The display name and address a mail client reads from a To field of `value` (RFC 2047
    6.2: white space between encoded words is dropped, which the address parser of Python's
    own `email.policy.default` does not do), and how many addresses it finds."""
    field = format_field("To", value)
    assert field.isascii()
    parsed = email.message_from_bytes(field + b"\r\n", policy=email.policy.compat32)
    addresses = getaddresses(parsed.get_all("To", []))
    name = str(make_header(decode_header(addresses[0][0])))
    return name, addresses[0][1], len(addresses)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("Paula Prospect", "Paula Prospect"),
        ("Łukasz Wiśniewski", "Łukasz Wiśniewski"),
        ('Müller, Peter "Pete"', 'Müller, Peter "Pete"'),
        ('Meier, Hans \\ "Hansi"', 'Meier, Hans \\ "Hansi"'),
        ("Dr. Jörg (Käufer)", "Dr. Jörg (Käufer)"),
        ("looks =?utf-8?q?encoded?=", "looks =?utf-8?q?encoded?="),
        ("Evil\r\nBcc: victim@example.org", "Evil Bcc: victim@example.org"),
        ("Ωμέγα " * 30, ("Ωμέγα " * 30).strip()),
        ("", ""),
    ],
)
def test_a_client_reads_back_the_name_and_the_address(name: str, shown: str) -> None:
    assert read_back(named_address(name, "paula@example.com")) == (shown, "paula@example.com", 1)
