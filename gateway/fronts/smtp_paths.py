"""The address of MAIL FROM and RCPT TO, read quickly when it is a plain `<local@domain>`.

aiosmtpd reads every path with the email package's full RFC 5322 parser, and declares a
typing.Protocol class inside its `_getaddr` on every call; together about a fifth of a
millisecond per command. Nearly every path is a dot-atom local part at a dot-separated
domain, whose addr_spec is the text between the brackets; that case is read with one
regular expression here, and anything else (quoted local parts, comments, domain literals,
source routes, non-ASCII, the null path) goes to aiosmtpd's parser as before.
"""

from __future__ import annotations

import re

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
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
