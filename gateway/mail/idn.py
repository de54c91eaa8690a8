"""International domain names and addresses on the way out.

An address may come in UTF-8 (SMTPUTF8, RFC 6531), and a domain in its Unicode form. The
next hop may not take UTF-8, and DNS takes only A-labels (`xn--...`). The A-labels are those
of IDNA 2008 with UTS 46's mapping, as email-validator checks a domain at intake and browsers
resolve it: Python's own "idna" codec is IDNA 2003, which turns `straße.de` into
`strasse.de`, another domain with other mail servers.
"""

from __future__ import annotations

import idna

__all__ = ["ascii_address", "ascii_domain"]


def ascii_domain(domain: str) -> str:
    """`domain` in A-labels; an ASCII one as it is. Raises ValueError (idna.IDNAError) when
    it is no domain name."""
    if domain.isascii():
        return domain
    return idna.encode(domain, uts46=True).decode("ascii")


def ascii_address(address: str) -> str | None:
    """`address` as a hop without SMTPUTF8 can take it: the same mailbox, its domain in
    A-labels (RFC 5890 2.3.2.1: both forms name one domain). None when its local part is not
    ASCII, which nothing but SMTPUTF8 carries (RFC 6531 3.2), or its domain is no domain."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{ascii_domain(domain)}"
    except ValueError:
        return None
