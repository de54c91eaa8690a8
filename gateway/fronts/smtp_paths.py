"""The address of MAIL FROM and RCPT TO, read quickly when it is a plain `<local@domain>`.

aiosmtpd reads every path with the email package's full RFC 5322 parser, and declares a
typing.Protocol class inside its `_getaddr` on every call; together about a fifth of a
millisecond per command. Nearly every path is a dot-atom local part at a dot-separated
domain, whose addr_spec is the text between the brackets; that case is read with one
regular expression here, and anything else (quoted local parts, comments, domain literals,
source routes, UTF-8 (RFC 6531), the null path) goes to aiosmtpd's parser as before.
"""

from __future__ import annotations

import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

from gateway.fronts.smtp_replies import Reply

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")  # RFC 3461 4
_PLAIN = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


def plain_path(arg: str) -> tuple[str, str] | None:
    """(the address, the rest after `>` and its spaces) for a plain `<local@domain>...`,
    as aiosmtpd's parser gives them; None when the path needs the full parser."""
    found = _PLAIN.match(arg)
    if found is None:
        return None
    # the parser takes the spaces after `>` with the path; a comment there needs it
    rest = arg[found.end() :].lstrip(" \t")
    if rest.startswith("("):
        return None
    return found.group(1), rest


def read_path(arg: str) -> tuple[str, str] | None:
    """(the address, the rest) of a MAIL or RCPT path; ("", "") for an empty argument;
    None for one that cannot be read. Any path that is not plain is read by the email
    package's RFC 5322 parser, as aiosmtpd read every path."""
    plain = plain_path(arg)
    if plain is not None:
        return plain
    if not arg:
        return "", ""
    try:
        address = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
    except HeaderParseError:
        return None
    return str(address[0].addr_spec), str(address[1])


def after_keyword(keyword: str, arg: str) -> str | None:
    """`arg` past `FROM:` or `TO:` (in any case), or None when it does not start so."""
    if arg[: len(keyword)].upper() == keyword:
        return arg[len(keyword) :].strip()
    return None


def parameters(options: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (`SIZE=5123`, `BODY=8BITMIME`) by keyword, a bare keyword as True;
    None when one is malformed (RFC 1869)."""
    found: dict[str, str | bool] = {}
    for option in options:
        keyword, equals, value = option.partition("=")
        if not keyword.isalnum() or (equals and not value):
            return None
        found[keyword] = value if equals else True
    return found


def mail_parameters_problem(options: list[str], size_limit: int | None, syntax: str) -> str | None:
    """The reply refusing MAIL's parameters (uppercased); None when they are fine. `syntax`
    is the reply to a malformed one. SMTPUTF8 (RFC 6531) lets the envelope's addresses be
    UTF-8; it takes no value. AUTH= (RFC 4954 5), which Exim and other
    MTAs that log in to a smart host add to every MAIL, names who first submitted the
    message; the relay goes by the login instead, so the value is only checked for its form."""
    found = parameters(options)
    if found is None:
        return syntax
    if found.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
        return "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
    if found.pop("SMTPUTF8", True) is not True:
        return "501 5.5.4 Error: SMTPUTF8 takes no value"
    auth = found.pop("AUTH", "<>")
    if auth != "<>" and (isinstance(auth, bool) or not _XTEXT.fullmatch(auth)):
        return "501 5.5.4 Error: AUTH= takes <> or an xtext mailbox (RFC 4954 5)"
    size = found.pop("SIZE", None)
    if size:
        if isinstance(size, bool) or not size.isdigit():
            return syntax
        if size_limit and int(size) > size_limit:
            return Reply.TOO_BIG.format(limit=size_limit)
    if found:
        return f"555 5.5.4 Unsupported MAIL FROM parameter: {min(found)}"
    return None
