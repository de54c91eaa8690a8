"""Checking a released original (an .eml) against the key, the database and the journal.

A released offer carries the evidence headers (gateway/letters/evidence.py) under our DKIM
signature. `verify_released` answers whether that copy is genuine and unchanged, and whether
what it says matches what we recorded:

1. the DKIM signature by a configured domain verifies, offline, with the configured key,
   by dkimpy (an implementation independent of our signer),
2. its h= covers both evidence headers, each once more than it occurs, so none can have
   been added since,
3. the evidence headers parse,
4. the consent they name is in the database with the same time, IP address, texts hash and
   letter time,
5. the stored texts still hash to the stored hash (and to the letter's),
6. the journal holds the consent.given and letter.released events for it,
7. the journal's hash chain is intact.

Every check is run that can be; the first one that fails is the verdict's reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dkim as dkimpy
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.letters.evidence import (
    Evidence,
    EvidenceError,
    ShownBlock,
    parse_evidence,
    rfc3339,
    texts_sha256,
)
from gateway.mail import headers
from gateway.mail.dkim import DkimError, DkimKey, public_txt_value
from gateway.mail.evidence_headers import EVIDENCE_HEADERS
from gateway.store import journal
from gateway.store.blobs import BlobStore, is_digest
from gateway.store.db import Database
from gateway.store.events import CONSENT_GIVEN, LETTER_RELEASED
from gateway.store.models import Consent, Delivery, Event, Letter, Message

REQUIRED_EVENTS = (CONSENT_GIVEN.name, LETTER_RELEASED.name)

CHECK_SIGNATURE = "DKIM signature"
CHECK_OVERSIGNED = "evidence headers signed"
CHECK_EVIDENCE = "evidence headers"
CHECK_CONSENT = "consent in the database"
CHECK_TEXTS = "texts hash"
CHECK_EVENTS = "journal events"
CHECK_CHAIN = "journal chain"

_TAG = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=(.*)$", re.DOTALL)
_FWS = re.compile(r"\s+")


@dataclass(frozen=True)
class VerificationReport:
    """`checks` holds (name, passed, detail) in the order they were made."""

    ok: bool
    checks: list[tuple[str, bool, str]]
    consent_id: str | None = None

    @property
    def reason(self) -> str:
        """The first failed check's detail, or "" when everything passed."""
        return next((detail for _, passed, detail in self.checks if not passed), "")

    def lines(self) -> list[str]:
        """The verdict and one line per check, as `sealrelay verify` prints them."""
        if self.ok:
            first = f"OK: consent {self.consent_id} is genuine and matches the journal"
        else:
            first = f"NOT OK: {self.reason}"
        marks = [
            f"{'✓' if passed else '✗'} {name}: {detail}" for name, passed, detail in self.checks
        ]
        return [first, *marks]


@dataclass
class _Checks:
    items: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.items.append((name, passed, detail))
        return passed


@dataclass(frozen=True)
class _Signature:
    index: int  # among the message's DKIM-Signature fields, topmost 0 (dkimpy's idx)
    domain: str
    selector: str
    signed: tuple[str, ...]  # h=, lower-cased


async def verify_released(db: Database, settings: Settings, raw: bytes) -> VerificationReport:
    """Whether `raw`, a released original, is genuine and matches our records."""
    checks = _Checks()
    fields = headers.fields_of(raw)

    signature = _check_signature(checks, settings, raw, fields)
    _check_oversigned(checks, signature, fields)
    evidence: Evidence | None = None
    try:
        evidence = parse_evidence(raw)
    except EvidenceError as exc:
        checks.add(CHECK_EVIDENCE, False, str(exc))
    else:
        checks.add(
            CHECK_EVIDENCE,
            True,
            f"consent {evidence.consent_id} at {rfc3339(evidence.given_at)}"
            f" from {evidence.ip}, texts sha256:{evidence.texts_sha256}",
        )

    async with db.snapshot() as session:  # the records and the chain of one moment
        if evidence is not None:
            consent = await session.get(Consent, evidence.consent_id)
            if consent is None:
                checks.add(
                    CHECK_CONSENT, False, f"consent {evidence.consent_id} is not in the database"
                )
            else:
                _compare(checks, evidence, consent)
                letter = await session.get(Letter, consent.letter_id)
                _check_texts(checks, consent, letter)
                _check_events(checks, consent.id, await consent_events(session, consent.id))
        chain = await journal.verify(session)
    if chain.ok:
        checks.add(CHECK_CHAIN, True, f"{chain.events} events, chain intact")
    else:
        checks.add(
            CHECK_CHAIN,
            False,
            f"the journal's hash chain is broken at event {chain.broken_at}: {chain.reason}",
        )
    return VerificationReport(
        ok=all(passed for _, passed, _ in checks.items),
        checks=checks.items,
        consent_id=evidence.consent_id if evidence is not None else None,
    )


# -- the signature ---------------------------------------------------------------------------


def _signatures(fields: Sequence[headers.HeaderField]) -> list[_Signature]:
    found = []
    index = 0
    for header_field in fields:
        if header_field.name != "dkim-signature":
            continue
        tags = _tags(header_field.value)
        found.append(
            _Signature(
                index=index,
                domain=tags.get("d", "").lower().rstrip("."),
                selector=tags.get("s", ""),
                signed=tuple(
                    name.strip().lower() for name in tags.get("h", "").split(":") if name.strip()
                ),
            )
        )
        index += 1
    return found


def _tags(value: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in value.split(";"):
        match = _TAG.match(part)
        if match:
            tags.setdefault(match[1], _FWS.sub("", match[2]))
    return tags


def _check_signature(
    checks: _Checks, settings: Settings, raw: bytes, fields: Sequence[headers.HeaderField]
) -> _Signature | None:
    signatures = _signatures(fields)
    ours = [s for s in signatures if s.domain in settings.dkim]
    if not ours:
        found = ", ".join(f"d={s.domain}" for s in signatures) or "none"
        configured = ", ".join(sorted(settings.dkim)) or "none configured"
        checks.add(
            CHECK_SIGNATURE,
            False,
            f"no DKIM signature by a configured domain ({configured}); found: {found}",
        )
        return None
    signature = ours[0]
    entry = settings.dkim[signature.domain]
    if signature.selector != entry.selector:
        checks.add(
            CHECK_SIGNATURE,
            False,
            f"signed by d={signature.domain} with selector {signature.selector!r}, but the"
            f" configured key is selector {entry.selector!r}",
        )
        return signature
    try:
        key = DkimKey.load(signature.domain, entry.selector, entry.key_file)
    except DkimError as exc:
        checks.add(CHECK_SIGNATURE, False, f"cannot load the configured key: {exc}")
        return signature
    verifier = dkimpy.DKIM(raw, minkey=1024)
    try:
        valid = verifier.verify(idx=signature.index, dnsfunc=_offline_dns(key))
    except dkimpy.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            checks.add(
                CHECK_SIGNATURE,
                False,
                "the body was changed after signing (DKIM body hash mismatch)",
            )
        else:
            checks.add(CHECK_SIGNATURE, False, f"the DKIM signature is invalid: {exc}")
        return signature
    except dkimpy.DKIMException as exc:
        checks.add(CHECK_SIGNATURE, False, f"the DKIM signature is malformed: {exc}")
        return signature
    if not valid:
        checks.add(CHECK_SIGNATURE, False, _header_change(signature, fields))
        return signature
    checks.add(
        CHECK_SIGNATURE,
        True,
        f"valid signature by d={signature.domain} s={signature.selector}"
        " (checked offline with the configured key)",
    )
    return signature


def _offline_dns(key: DkimKey) -> Callable[..., bytes]:
    """A dkimpy dnsfunc that knows exactly one record: the configured key's."""
    record = public_txt_value(key).encode("ascii")
    name = f"{key.selector}._domainkey.{key.domain}.".lower().encode("ascii")

    def lookup(query: bytes, timeout: int = 5) -> bytes:
        return record if query.lower() == name else b""

    return lookup


def _header_change(signature: _Signature, fields: Sequence[headers.HeaderField]) -> str:
    """Why a signature over the header fields fails, as precisely as the counts tell.

    A release carries one of each evidence field, so h= lists each twice when oversigned
    (once when not): more or fewer of them now means one was added or removed.
    """
    for name in EVIDENCE_HEADERS:
        listed = signature.signed.count(name.lower())
        if not listed:
            continue
        signed = max(listed - 1, 1)
        present = sum(1 for f in fields if f.name == name.lower())
        if present > signed:
            return f"the DKIM signature does not verify: {name} was added after signing"
        if present < signed:
            return f"the DKIM signature does not verify: {name} was removed after signing"
    return (
        "the DKIM signature does not verify: a signed header field was changed after"
        " signing, or another key made it"
    )


def _check_oversigned(
    checks: _Checks, signature: _Signature | None, fields: Sequence[headers.HeaderField]
) -> None:
    if signature is None:
        checks.add(CHECK_OVERSIGNED, False, "no signature of ours to check h= of")
        return
    problems = []
    for name in EVIDENCE_HEADERS:
        listed = signature.signed.count(name.lower())
        present = sum(1 for f in fields if f.name == name.lower())
        if listed == 0:
            problems.append(f"{name} is not signed")
        elif present == 0:
            problems.append(f"{name} is missing")
        elif listed != present + 1:
            problems.append(
                f"{name} occurs {present} time(s) and is listed {listed} time(s) in h="
                " (needs one more, so that none can be added)"
            )
    if problems:
        checks.add(CHECK_OVERSIGNED, False, "; ".join(problems))
    else:
        checks.add(CHECK_OVERSIGNED, True, "h= covers both and oversigns them")


# -- the records -----------------------------------------------------------------------------


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _compare(checks: _Checks, evidence: Evidence, consent: Consent) -> None:
    differences = []
    recorded_at = consent.given_at.replace(microsecond=0)
    if recorded_at != evidence.given_at:
        differences.append(
            f"time {rfc3339(evidence.given_at)} in the header, {rfc3339(recorded_at)} recorded"
        )
    if not _same_ip(evidence.ip, consent.ip):
        differences.append(f"IP address {evidence.ip} in the header, {consent.ip} recorded")
    if evidence.texts_sha256 != consent.texts_sha256:
        differences.append(
            f"texts hash {evidence.texts_sha256} in the header, {consent.texts_sha256} recorded"
        )
    letter_sent = consent.letter_sent_at.replace(microsecond=0)
    if letter_sent != evidence.letter_sent_at:
        differences.append(
            f"letter sent {rfc3339(evidence.letter_sent_at)} in the header,"
            f" {rfc3339(letter_sent)} recorded"
        )
    if differences:
        checks.add(
            CHECK_CONSENT,
            False,
            f"consent {consent.id} differs from the header: " + "; ".join(differences),
        )
    else:
        checks.add(CHECK_CONSENT, True, f"consent {consent.id}: time, IP address, texts hash match")


def _check_texts(checks: _Checks, consent: Consent, letter: Letter | None) -> None:
    try:
        recomputed = texts_sha256([ShownBlock(**block) for block in consent.blocks])
    except TypeError as exc:
        checks.add(
            CHECK_TEXTS, False, f"the stored texts of consent {consent.id} are unreadable: {exc}"
        )
        return
    if recomputed != consent.texts_sha256:
        checks.add(
            CHECK_TEXTS,
            False,
            f"the stored texts of consent {consent.id} hash to {recomputed},"
            f" not to the recorded {consent.texts_sha256}",
        )
    elif letter is not None and letter.texts_sha256 != consent.texts_sha256:
        checks.add(
            CHECK_TEXTS,
            False,
            f"consent {consent.id} records texts {consent.texts_sha256},"
            f" its letter {letter.id} carried {letter.texts_sha256}",
        )
    else:
        checks.add(CHECK_TEXTS, True, f"the stored texts hash to sha256:{recomputed}")


async def consent_events(session: AsyncSession, consent_id: str) -> list[Event]:
    """The journal events that name this consent (data["consent_id"]), in the order they
    were written, chained or not yet."""
    rows = await session.scalars(
        select(Event).where(Event.data["consent_id"].as_string() == consent_id).order_by(Event.id)
    )
    return list(rows.all())


def chain_number(event: Event) -> str:
    """`#seq`, or what stands for it while the sequencer has not chained the event yet."""
    return f"#{event.seq}" if event.seq is not None else "(not chained yet)"


def _check_events(checks: _Checks, consent_id: str, events: Sequence[Event]) -> None:
    by_type = {event.type: event for event in reversed(events)}  # the first of each type
    missing = [kind for kind in REQUIRED_EVENTS if kind not in by_type]
    if missing:
        checks.add(
            CHECK_EVENTS,
            False,
            f"the journal has no {' and no '.join(missing)} event for consent {consent_id}",
        )
        return
    checks.add(
        CHECK_EVENTS,
        True,
        ", ".join(
            f"{kind} {chain_number(by_type[kind])} at {rfc3339(by_type[kind].at)}"
            for kind in REQUIRED_EVENTS
        ),
    )


# -- `sealrelay evidence` --------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentEvidence:
    """A consent with everything `sealrelay evidence` shows about it."""

    consent: Consent
    letter: Letter | None
    message: Message | None
    events: list[Event]
    recomputed_sha256: str | None
    files: tuple[EvidenceFile, ...] = ()


@dataclass(frozen=True)
class EvidenceFile:
    """One stored file of the evidence and whether the blob store still has it."""

    label: str  # "held original", "released original", "consent PDF"
    digest: str
    location: str | None  # None when the stored name is not a digest
    present: bool


async def consent_evidence(
    db: Database, blobs: BlobStore, consent_id: str
) -> ConsentEvidence | None:
    """The stored record of a consent, or None for an id we do not know."""
    async with db.transaction() as session:
        consent = await session.get(Consent, consent_id)
        if consent is None:
            return None
        letter = await session.get(Letter, consent.letter_id)
        message = await session.get(Message, letter.message_id) if letter is not None else None
        events = await consent_events(session, consent.id)
        released = await session.get(Delivery, consent.released_delivery_id)
    digests = [
        ("held original", letter.held_blob if letter is not None else ""),
        ("released original", released.blob if released is not None else ""),
        ("consent PDF", consent.pdf_blob),
    ]
    if released is not None and released.signed_blob is not None:
        digests.insert(2, ("released original, signed as delivered", released.signed_blob))
    try:
        recomputed: str | None = texts_sha256([ShownBlock(**b) for b in consent.blocks])
    except TypeError:
        recomputed = None
    return ConsentEvidence(
        consent=consent,
        letter=letter,
        message=message,
        events=events,
        recomputed_sha256=recomputed,
        files=tuple([await _evidence_file(blobs, label, d) for label, d in digests]),
    )


async def _evidence_file(blobs: BlobStore, label: str, digest: str) -> EvidenceFile:
    if not is_digest(digest):
        return EvidenceFile(label, digest, None, False)
    return EvidenceFile(label, digest, await blobs.where(digest), await blobs.exists(digest))
