"""What a prospect's consent consists of, and how it is written into the released original.

The texts shown are hashed in one canonical form, so the hash in the evidence header, the
consent record and the consent PDF can be compared byte for byte years later.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from gateway.mail import headers
from gateway.mail.evidence_headers import (
    CONSENT_HEADER,
    LETTER_SENT_HEADER,
    RELEASED_BY_AGENT_HEADER,
)

_CONSENT_VALUE = re.compile(
    r"^at=(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ); ip=(?P<ip>[0-9a-fA-F.:]+);"
    r" id=(?P<id>[0-9a-f]{20,32}); texts=sha256:(?P<texts>[0-9a-f]{64})$"
)


@dataclass(frozen=True)
class ShownBlock:
    """One consent block exactly as the prospect saw it."""

    id: str
    title: str
    text: str
    checkbox: str | None

    @property
    def required(self) -> bool:
        return self.checkbox is not None


def texts_sha256(blocks: Sequence[ShownBlock]) -> str:
    canonical = json.dumps(
        [asdict(block) for block in blocks],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ConsentRecord:
    """Everything the consent PDF and the agent's confirmation show."""

    consent_id: str
    recipient: str
    subject: str
    agent: str
    company: str
    language: str
    letter_sent_at: datetime
    given_at: datetime
    ip: str
    user_agent: str
    blocks: tuple[ShownBlock, ...]
    checked: frozenset[str]
    texts_sha256: str


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def evidence_fields(
    consent_id: str, given_at: datetime, ip: str, texts: str, letter_sent_at: datetime
) -> list[bytes]:
    """The evidence header fields, from values we generated or validated, never raw input."""
    address = str(ipaddress.ip_address(ip))
    value = f"at={rfc3339(given_at)}; ip={address}; id={consent_id}; texts=sha256:{texts}"
    if not _CONSENT_VALUE.match(value):
        raise ValueError(f"refusing to write evidence {value!r}")
    return [
        headers.format_field(CONSENT_HEADER, value),
        headers.format_field(LETTER_SENT_HEADER, rfc3339(letter_sent_at)),
    ]


def released_by_agent_field(letter_id: str, at: datetime) -> bytes:
    """The header of an offer the agent released without consent: never consent evidence."""
    value = f"at={rfc3339(at)}; letter={letter_id}; consent=none"
    if not re.fullmatch(r"[A-Za-z0-9=;:. _-]+", value):
        raise ValueError(f"refusing to write {value!r}")
    return headers.format_field(RELEASED_BY_AGENT_HEADER, value)


@dataclass(frozen=True)
class Evidence:
    consent_id: str
    given_at: datetime
    ip: str
    texts_sha256: str
    letter_sent_at: datetime


class EvidenceError(Exception):
    """The message carries no, several, or malformed evidence headers."""


def parse_evidence(raw: bytes) -> Evidence:
    fields = headers.fields_of(raw)
    consent = headers.values(fields, CONSENT_HEADER)
    sent = headers.values(fields, LETTER_SENT_HEADER)
    if len(consent) != 1 or len(sent) != 1:
        raise EvidenceError(
            f"expected one {CONSENT_HEADER} and one {LETTER_SENT_HEADER} header,"
            f" found {len(consent)} and {len(sent)}"
        )
    match = _CONSENT_VALUE.match(" ".join(consent[0].split()))
    if match is None:
        raise EvidenceError(f"{CONSENT_HEADER} is malformed: {consent[0]!r}")
    try:
        letter_sent = datetime.strptime(sent[0].strip(), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise EvidenceError(f"{LETTER_SENT_HEADER} is malformed: {sent[0]!r}") from exc
    return Evidence(
        consent_id=match["id"],
        given_at=datetime.strptime(match["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        ip=match["ip"],
        texts_sha256=match["texts"],
        letter_sent_at=letter_sent.replace(tzinfo=UTC),
    )
