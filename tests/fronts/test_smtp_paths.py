"""The quick reading of MAIL and RCPT paths gives what aiosmtpd's full parser gives, and
leaves every path it does not fully understand to that parser."""

from __future__ import annotations

import random
import string

import pytest
from aiosmtpd.smtp import SMTP

from gateway.fronts.smtp_paths import mail_parameters_problem, plain_path, read_path


class _Server(SMTP):
    def __init__(self, local_part_limit: int = 0) -> None:
        self.local_part_limit = local_part_limit


def aiosmtpd_reading(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    return SMTP._getaddr(_Server(local_part_limit), arg)


PLAIN = [
    "<a@b.c>",
    "<agent@bench.example> SIZE=5123",
    "<a.b+tag@c-d.example>  BODY=8BITMIME",
    "<A_B@Example.COM>",
    "<x@localhost>",
    "<a@b.c> \t SMTPUTF8",
    "<a@b.c>",
    "<!#$%&'*+/=?^_`{|}~-@d.e>",
]
FULL_PARSER = [
    "",
    "<>",
    "<a..b@c>",
    "<.a@c>",
    "<a.@c>",
    "<a@c.>",
    "<a@[192.0.2.1]>",
    '<"a b"@c>',
    "<@relay.example:a@b>",
    "<a@b(comment)>",
    "<a@b.c> (comment) SIZE=1",
    "<a@b.c>(comment)",
    " <a@b.c>",
    "a@b.c",
    "<a@b.c",
    "<jörg@b.c>",
    "<a@bücher.example>",
    "<a @b.c>",
]


@pytest.mark.parametrize("arg", PLAIN)
def test_a_plain_path_reads_as_the_full_parser_reads_it(arg: str) -> None:
    assert plain_path(arg) is not None
    assert plain_path(arg) == aiosmtpd_reading(arg)


@pytest.mark.parametrize("arg", FULL_PARSER)
def test_anything_else_is_left_to_the_full_parser(arg: str) -> None:
    assert plain_path(arg) is None


def test_random_paths_read_alike_wherever_read_quickly() -> None:
    chars = string.ascii_letters[:5] + string.digits[:2] + '.-_+@<>" ()[]=!#~\t,;:\\é'
    rest = ["", " SIZE=1", "x", " ", "\t(c) X", " (c)", "(c)", "  \t B=1", ">"]
    rng = random.Random(18)
    quick = 0
    for _ in range(50_000):
        local = "".join(rng.choice(chars) for _ in range(rng.randint(0, 4)))
        domain = "".join(rng.choice(chars) for _ in range(rng.randint(0, 4)))
        arg = f"<{local}{rng.choice(['@', ''])}{domain}>{rng.choice(rest)}"
        read = plain_path(arg)
        if read is not None:
            quick += 1
            assert read == aiosmtpd_reading(arg), arg
    assert quick > 50


@pytest.mark.parametrize("arg", PLAIN + FULL_PARSER)
def test_every_path_reads_as_aiosmtpd_read_it(arg: str) -> None:
    """The front's reading, quick or full, is the one clients knew from aiosmtpd."""
    read = read_path(arg)
    assert (read if read is not None else (None, None)) == aiosmtpd_reading(arg)


SYNTAX = "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"


@pytest.mark.parametrize(
    ("options", "reply"),
    [
        ("", None),
        ("SIZE=100 BODY=8BITMIME", None),
        ("BODY=7BIT", None),
        ("SIZE=1001", "552 5.3.4 The message is too big; at most 1000 bytes are accepted"),
        ("SIZE=x", SYNTAX),
        ("SIZE", SYNTAX),  # SIZE needs its number
        ("BODY=BINARYMIME", "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"),
        ("SMTPUTF8", None),
        ("SMTPUTF8 BODY=8BITMIME SIZE=10", None),
        ("SMTPUTF8=1", "501 5.5.4 Error: SMTPUTF8 takes no value"),
        ("SMTPUTF8 RET=HDRS", "555 5.5.4 Unsupported MAIL FROM parameter: RET"),
        # RFC 4954 5: what Postfix adds once it logged in, and a mailbox in xtext
        ("AUTH=<>", None),
        ("SIZE=100 AUTH=<> BODY=8BITMIME", None),
        ("AUTH=AGENT+2BTAG@BROKER.EXAMPLE", None),
        ("AUTH=A+2", "501 5.5.4 Error: AUTH= takes <> or an xtext mailbox (RFC 4954 5)"),
        ("AUTH=A+B", "501 5.5.4 Error: AUTH= takes <> or an xtext mailbox (RFC 4954 5)"),
        ("AUTH", "501 5.5.4 Error: AUTH= takes <> or an xtext mailbox (RFC 4954 5)"),
        ("RET=HDRS", "555 5.5.4 Unsupported MAIL FROM parameter: RET"),
        ("SIZE=", SYNTAX),
        ("A-B=1", SYNTAX),
    ],
)
def test_mail_parameters_are_refused_with_their_reason(options: str, reply: str | None) -> None:
    assert mail_parameters_problem(options.split(), 1000, SYNTAX) == reply
