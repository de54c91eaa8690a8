"""Trusted clients: systems that send through the relay without AUTH (`[[smtp.trusted]]`).

A Microsoft 365 outbound connector, Google Workspace's SMTP relay, a CRM or a scanner cannot
log in as an agent. An entry names them by network and, optionally, by the name in a TLS
client certificate verified against the entry's own CAs. A client matches an entry only when
every condition the entry gives holds; a client that matches none is an unknown client and
gets exactly the answers it got before (530 until it logs in): the relay never becomes an
open relay. A matched client sends for "the domains we serve" (see `served_domains`), not
for any address. docs/trusted-hosts.md is the user's side of this.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from gateway import users
from gateway.config import Settings, TrustedClient
from gateway.mail import headers
from gateway.rejections import Rejected
from gateway.store.db import Database
from rules.domains import domain_of

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedEntry:
    """An entry as the front uses it: networks parsed, CA certificates loaded once."""

    settings: TrustedClient
    networks: tuple[IpNetwork, ...]
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, settings: TrustedClient) -> TrustedEntry:
        authorities: list[x509.Certificate] = []
        if settings.client_ca is not None:
            where = f"smtp.trusted {settings.name}: client_ca {settings.client_ca}"
            try:
                authorities = x509.load_pem_x509_certificates(settings.client_ca.read_bytes())
            except OSError as exc:
                raise RuntimeError(f"{where}: cannot read: {exc.strerror}") from exc
            except ValueError as exc:
                raise RuntimeError(f"{where}: no PEM certificates in it") from exc
        return cls(
            settings,
            tuple(ipaddress.ip_network(n, strict=False) for n in settings.networks),
            tuple(authorities),
        )

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True)
class ClientFacts:
    """What the front knows of a client: its address, whether it speaks TLS, and the
    certificate it presented (DER), which the TLS layer has verified against every
    entry's CAs together; `match` checks it against the entry's own."""

    peer: str
    tls: bool
    certificate: bytes | None = None


@dataclass(frozen=True)
class TrustedMatch:
    entry: TrustedEntry
    certificate_name: str | None


def match(entries: Iterable[TrustedEntry], client: ClientFacts) -> TrustedMatch | None:
    """The first entry whose every condition the client meets, or None."""
    address = _address(client.peer)
    if address is None:
        return None
    leaf = _certificate(client.certificate)
    for entry in entries:
        if not any(address in network for network in entry.networks):
            continue
        if entry.settings.require_tls and not client.tls:
            continue
        if not entry.settings.certificate_names:
            return TrustedMatch(entry, None)
        if leaf is None or not _issued_by(leaf, entry.authorities):
            continue
        name = next((n for n in names_in(leaf) if n in entry.settings.certificate_names), None)
        if name is not None:
            return TrustedMatch(entry, name)
    return None


def names_in(certificate: x509.Certificate) -> list[str]:
    """The subject's common names and DNS subject alternative names, lower-cased."""
    names = [
        str(attribute.value)
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return [n.lower().rstrip(".") for n in names]


def _issued_by(leaf: x509.Certificate, authorities: tuple[x509.Certificate, ...]) -> bool:
    """The TLS layer verified the chain against all entries' CAs together; this ties the
    certificate to this entry's: one of them must have issued it."""
    for authority in authorities:
        try:
            leaf.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _certificate(der: bytes | None) -> x509.Certificate | None:
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Kept per text: a client connects again and again (a connection per message), and
    parsing the address cost more than matching it."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sends_for(domains: frozenset[str], sender: str) -> bool:
    """Whether MAIL FROM's `sender` is in one of `domains`. The null sender "" is in all:
    its From header must be in one, which the end of DATA checks."""
    return not sender or domain_of(sender) in domains


async def served_domains(settings: Settings, db: Database) -> frozenset[str]:
    """The domains we serve: those of every user's address and alias, and the [dkim] domains.

    An entry's own `domains` list narrows a trusted client to fewer.
    """
    return await users.address_domains(db) | frozenset(settings.dkim)


@dataclass(frozen=True)
class TrustedSubmitter:
    """A trusted client's mail as the pipeline sees it: the entry's service sends for its
    domains; with `map_agents`, mail from an agent's address counts as that agent's (their
    group's policy applies, the console shows it as theirs)."""

    service: str
    domains: frozenset[str]
    user_id: int | None = None
    group: str | None = None

    def may_send_as(self, address: str) -> bool:
        return domain_of(address) in self.domains


class ServedDomains:
    """`served_domains`, kept between messages: reading every user and alias for each MAIL
    FROM cost a trusted client's message more than the rest of its checks.

    A sender's domain that is not among the kept ones is looked up again at once, so a user
    or alias just added (by the console, or `sealrelay user` in another process) sends
    straight away. A domain no longer served is refused once the kept set is `FRESH`
    seconds old; until then its mail still goes out, as it did a moment before.
    """

    FRESH = 10.0

    def __init__(
        self, settings: Settings, db: Database, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self._kept: frozenset[str] | None = None
        self._read_at = 0.0

    async def allowed(self, found: TrustedMatch, sender: str) -> frozenset[str]:
        """The domains this client may send for, read again if `sender`'s is not among them
        (the null sender's "" reads nothing again)."""
        served = self._kept
        if (
            served is None
            or self.clock() - self._read_at > self.FRESH
            or not sends_for(served, sender)
        ):
            read_at = self.clock()
            served = await served_domains(self.settings, self.db)
            self._kept, self._read_at = served, read_at
        own = found.entry.settings.domains
        return served if own is None else served & frozenset(own)


async def submitter_for(
    found: TrustedMatch, domains: frozenset[str], db: Database, addresses: Iterable[str]
) -> TrustedSubmitter:
    """The submitter for a trusted client's message; `addresses` are tried in order (the
    envelope sender, then the From header's) for an agent when the entry maps agents."""
    service = found.entry.settings.service_name
    if found.entry.settings.map_agents:
        for address in addresses:
            agent = await users.agent_by_address(db, address)
            if agent is not None:
                return TrustedSubmitter(service, domains, agent.user_id, agent.group)
    return TrustedSubmitter(service, domains)


def not_our_domain(address: str, where: str) -> str:
    """The refusal of a sender outside the domains a trusted client (or the milter's MTA)
    may send for."""
    return (
        f"550 5.7.1 This client may send only for the domains this relay serves;"
        f" <{address}> ({where}) is not in one of them"
    )


async def submitter_of_message(
    found: TrustedMatch, domains: frozenset[str], db: Database, mail_from: str, raw: bytes
) -> TrustedSubmitter:
    """The service (or mapped agent) a trusted client's message is sent by; its From header
    must be in `domains` too (as MAIL found them), or the message is refused with 550."""
    authors = headers.addresses(headers.fields_of(raw), "from")
    for author in authors:
        if domain_of(author) not in domains:
            raise Rejected(not_our_domain(author, "From header"))
    return await submitter_for(found, domains, db, [a for a in (mail_from, *authors) if a])
