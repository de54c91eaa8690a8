"""Domain names as one: `Bücher.example.`, `bücher.example` and `xn--bcher-kva.example` name
the same domain, and whatever compares domains (rules, routes, the domains a trusted client
sends for, the DKIM key of a From) compares them so.

The A-labels are those of IDNA 2008 with UTS 46's mapping, as email-validator checks a
domain at intake and browsers resolve it: Python's own "idna" codec is IDNA 2003, which turns
`straße.de` into `strasse.de`, another domain with other mail servers.
"""

from __future__ import annotations

import idna

__all__ = ["address_key", "ascii_domain", "domain_key", "domain_of"]


def ascii_domain(domain: str) -> str:
    """`domain` in A-labels; an ASCII one as it is. Raises ValueError (idna.IDNAError) when
    it is no domain name."""
    if domain.isascii():
        return domain
    return idna.encode(domain, uts46=True).decode("ascii")


def domain_key(domain: str) -> str:
    """`domain` as domains are compared: lower case, no final dot, in A-labels when it is
    international. A text that is no domain name stays as it is, lower-cased: it equals only
    itself."""
    name = domain.strip().lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return ascii_domain(name)
    except ValueError:
        return name


def domain_of(address: str) -> str:
    """The key of `address`'s domain (after its last @)."""
    return domain_key(address.rpartition("@")[2])


def address_key(address: str) -> str:
    """`address` as addresses are compared: in lower case, its domain by its key."""
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}" if at else address.lower()
