"""The SMTP listen addresses (`HOST:PORT`, `[::1]:PORT`) and the one rule on logins over them.

The listener applies the rule when it starts and check-config names its violations in
advance; both read it here, so they cannot disagree.
"""

from __future__ import annotations

import ipaddress

from gateway.config import SmtpSettings


def listen_host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def split_address(address: str) -> tuple[str, int]:
    return listen_host(address), int(address.rpartition(":")[2])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_logins_allowed(smtp: SmtpSettings, host: str) -> bool:
    """Logins without TLS only where the settings allow them and nobody else can listen."""
    return smtp.allow_plaintext_auth_on_loopback and is_loopback(host)


def logins_needed(smtp: SmtpSettings, address: str) -> bool:
    """Whether agents must be able to log in on `address`: on every listener but one that a
    `[[smtp.trusted]]` entry names as its own (Postfix handing mail over on loopback), where
    that client sends without AUTH, whether or not `[smtp] listen` names it too."""
    return not any(address in entry.listen for entry in smtp.trusted)
