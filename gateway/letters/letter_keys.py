"""A registered letter is evidence only when its released original is DKIM-signed.

So an offer from a domain without a `[dkim]` key is refused before 250, and `check-config`
names in advance the settings that would send such offers. Both read one fact: which sender
domains have a key.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import Settings
from gateway.mail import headers, outgoing
from gateway.problems import Problem
from gateway.rejections import Rejected
from rules.domains import domain_key, domain_of


class UnsignedLetter(Rejected):
    """An offer whose sender domain cannot sign its evidence, refused like any other."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        super().__init__(
            f"550 5.7.1 Registered letters from {domain} cannot be sealed: there is no DKIM"
            f' key for {domain} ([dkim."{domain}"] in the relay\'s settings). Ask IT to'
            " configure one, or send without the offer tag"
        )


def author_domain(raw: bytes) -> str:
    """The domain DKIM signs for (gateway.mail.outgoing.author_domain), by its key."""
    return outgoing.author_domain(headers.fields_of(raw)) or ""


def require_key(settings: Settings, raw: bytes) -> None:
    """Raise UnsignedLetter unless the offer's From domain has a DKIM key."""
    domain = author_domain(raw)
    if domain not in settings.dkim:
        raise UnsignedLetter(domain or "an address without a domain")


def problems(settings: Settings) -> list[Problem]:
    """Settings that would send registered letters for a domain without a DKIM key.

    Any sender may ask for a letter (a subject tag, X-Sealrelay-Action), so the domains named
    in the settings are checked: a rule's senders for certain, the internal domains likely.
    """
    found = [
        Problem(
            f"rules.{rule.name}",
            f"sets registered_letter for {domain}, which has no [dkim] key:"
            " its offers would be refused (550)",
            error=True,
        )
        for rule in settings.rules
        if rule.set.registered_letter
        for domain in _unsigned(settings, _sender_domains(rule.match.senders))
    ]
    if not settings.dkim:
        found.append(
            Problem(
                "dkim",
                "no key configured: every registered letter (offer) is refused with 550"
                ' until [dkim."DOMAIN"] is set for the sender\'s domain',
                error=False,
            )
        )
        return found
    found.extend(
        Problem(
            "policy.internal_domains",
            f"{domain} has no [dkim] key: registered letters (offers) from it are refused (550)",
            error=False,
        )
        for domain in _unsigned(settings, settings.policy.internal_domains or [])
    )
    return found


def _sender_domains(senders: Iterable[str]) -> list[str]:
    return [domain_of(sender) for sender in senders if "@" in sender]


def _unsigned(settings: Settings, domains: Iterable[str]) -> list[str]:
    return sorted({domain_key(d) for d in domains} - set(settings.dkim))
