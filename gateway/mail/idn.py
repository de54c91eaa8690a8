"""International addresses on the way out.

An address may come in UTF-8 (SMTPUTF8, RFC 6531), and its domain in its Unicode form. A next
hop that does not offer SMTPUTF8 takes only ASCII; the domain's A-labels (rules/domains.py)
name the same domain, a UTF-8 local part has no ASCII form.
"""

from __future__ import annotations

from rules.domains import ascii_domain

__all__ = ["ascii_address"]


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
