"""The DNS record each configured DKIM key needs, and whether DNS already shows it, for the
admins' DKIM page: what IT publishes, and a check that it arrived.

The value comes from the key the relay signs with (`gateway.mail.dkim.public_txt_value`), so
it is the one verifiers will compare against; the check compares only the published `p=`,
since a zone may add tags (`t=s`, `h=sha256`) or split the strings differently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from gateway.config import Settings
from gateway.dns_lookup import DnsLookup, TxtAnswer
from gateway.mail.dkim import DkimError, DkimKey, public_txt_value

TXT_STRING = 255  # octets one TXT string holds (RFC 1035); longer values are split


class DnsState(StrEnum):
    FOUND = "found"  # a record with our public key
    DIFFERENT = "different"  # DKIM records, none with our key (an old or another key)
    MISSING = "missing"  # no DKIM record at that name
    UNREACHABLE = "unreachable"  # not checked: no DNS server answered in time
    OFF = "off"  # not checked: `[console] dns_checks = false`
    NO_KEY = "no_key"  # not checked: the key file cannot be read


@dataclass(frozen=True)
class DkimRecord:
    domain: str
    selector: str
    name: str  # selector._domainkey.domain
    value: str | None  # None when the key cannot be read; then `problem` says why
    problem: str | None

    @property
    def strings(self) -> tuple[str, ...]:
        """The value as TXT strings of at most 255 characters, for DNS forms that want them."""
        if self.value is None:
            return ()
        return tuple(self.value[i : i + TXT_STRING] for i in range(0, len(self.value), TXT_STRING))


@dataclass(frozen=True)
class DnsCheck:
    state: DnsState
    published: tuple[str, ...] = ()  # the DKIM records DNS shows at the name


@dataclass(frozen=True)
class CheckedRecord:
    record: DkimRecord
    check: DnsCheck


def dkim_records(settings: Settings) -> tuple[DkimRecord, ...]:
    """One record per `[dkim."domain"]`, by domain."""
    records = []
    for domain, entry in sorted(settings.dkim.items()):
        name = f"{entry.selector}._domainkey.{domain.rstrip('.')}"
        try:
            key = DkimKey.load(domain, entry.selector, entry.key_file)
        except DkimError as exc:
            records.append(DkimRecord(domain, entry.selector, name, None, str(exc)))
            continue
        records.append(DkimRecord(domain, entry.selector, name, public_txt_value(key), None))
    return tuple(records)


def public_key_tag(value: str) -> str | None:
    """The `p=` of a DKIM record, without the spaces a zone may put into it."""
    for tag in value.split(";"):
        name, sep, data = tag.partition("=")
        if sep and name.strip() == "p":
            return "".join(data.split())
    return None


def compare(record: DkimRecord, answer: TxtAnswer) -> DnsCheck:
    if record.value is None:
        return DnsCheck(DnsState.NO_KEY)
    if not answer.reachable:
        return DnsCheck(DnsState.UNREACHABLE)
    ours = public_key_tag(record.value)
    published = tuple(r for r in answer.records if public_key_tag(r) is not None)
    if any(public_key_tag(r) == ours for r in published):
        return DnsCheck(DnsState.FOUND, published)
    if published:
        return DnsCheck(DnsState.DIFFERENT, published)
    return DnsCheck(DnsState.MISSING)


async def check_records(
    records: tuple[DkimRecord, ...], lookup: DnsLookup
) -> tuple[CheckedRecord, ...]:
    """Each record with what DNS shows, unless the lookup is switched off. The questions are
    asked side by side, so the page waits for one timeout at most."""

    async def check(record: DkimRecord) -> CheckedRecord:
        if record.value is None:
            return CheckedRecord(record, DnsCheck(DnsState.NO_KEY))
        if not lookup.enabled:
            return CheckedRecord(record, DnsCheck(DnsState.OFF))
        return CheckedRecord(record, compare(record, await lookup.txt(record.name)))

    return tuple(await asyncio.gather(*(check(record) for record in records)))
