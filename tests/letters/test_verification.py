"""`sealrelay verify FILE.eml` and `sealrelay evidence`: a released original checked offline
against the configured key, the consent in the database and the journal, on SQLite and
PostgreSQL; and every kind of tampering found with the right reason."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from gateway.config import Settings
from gateway.letters import consent_pdf
from gateway.letters.evidence import (
    ConsentRecord,
    ShownBlock,
    evidence_fields,
    texts_sha256,
)
from gateway.letters.verification import VerificationReport, consent_evidence, verify_released
from gateway.mail import dkim, outgoing
from gateway.mail.evidence_headers import CONSENT_HEADER, EVIDENCE_HEADERS, LETTER_SENT_HEADER
from gateway.mail.headers import remove_fields
from gateway.outbound.queue import new_delivery
from gateway.store import group_commit, journal
from gateway.store.db import Database
from gateway.store.events import CONSENT_GIVEN, LETTER_HELD, LETTER_RELEASED
from gateway.store.inline_blobs import InlineBlobStore
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import (
    Consent,
    Event,
    Letter,
    LetterStatus,
    Link,
    LinkKind,
    Message,
    new_id,
)
from gateway.store.sequencer import chain_all
from tests.cli_runner import sealrelay, sqlite_url, write_config
from tests.conftest import AGENT, DKIM_DOMAIN, DKIM_SELECTOR

PROSPECT = "prospect@example.com"
IP = "203.0.113.7"
GIVEN_AT = datetime(2026, 11, 23, 14, 5, 9, 654321, tzinfo=UTC)
LETTER_SENT_AT = datetime(2026, 11, 23, 13, 0, 1, 250000, tzinfo=UTC)
BLOCKS = (
    ShownBlock("withdrawal", "Widerrufsbelehrung", "Sie haben das Recht …", "Erhalten."),
    ShownBlock("terms", "Maklerbedingungen", "Provision 3,57 %.", "Ich beauftrage."),
    ShownBlock("privacy", "Datenschutz", "Wir verarbeiten …", None),
)
OFFER = (
    b"From: Anna Agent <agent@broker.example>\r\n"
    b"To: prospect@example.com\r\n"
    b"Subject: =?utf-8?q?=5BExpos=C3=A9=5D_Wohnung_mit_Balkon?=\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <offer-1@broker.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Guten Tag,\r\n"
    b"anbei das Expos\xc3\xa9 zur Wohnung mit Balkon.\r\n"
)


def verification_settings(storage: Path, key_file: Path) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"path": str(storage)},
            "dkim": {DKIM_DOMAIN: {"selector": DKIM_SELECTOR, "key_file": str(key_file)}},
        }
    )


def release(
    key: dkim.DkimKey,
    consent_id: str,
    *,
    ip: str = IP,
    texts: str | None = None,
    oversign: bool = True,
) -> bytes:
    """The released original as the letter code makes it: evidence on top, then signed."""
    fields = evidence_fields(
        consent_id, GIVEN_AT, ip, texts or texts_sha256(BLOCKS), LETTER_SENT_AT
    )
    stamped = b"".join(fields) + OFFER
    if oversign:
        signature = dkim.sign(stamped, key, extra_oversigned=EVIDENCE_HEADERS)
    else:
        signature = dkim.sign(stamped, key, extra_signed=EVIDENCE_HEADERS)
    return signature + stamped


@dataclass(frozen=True)
class Seeded:
    consent_id: str
    letter_id: str
    message_id: str
    released: bytes
    pdf_path: Path


async def seed(
    db: Database,
    settings: Settings,
    key: dkim.DkimKey,
    kinds: tuple[str, ...] = ("consent.given", "letter.released"),
) -> Seeded:
    """A held offer, its letter and link, the consent, the journal, as a release leaves them."""
    message_id, link_id, letter_id, consent_id = new_id(), new_id(), new_id(), new_id()
    record = ConsentRecord(
        consent_id=consent_id,
        recipient=PROSPECT,
        subject="[Exposé] Wohnung mit Balkon",
        agent=AGENT,
        company="Muster Immobilien GmbH",
        language="de",
        letter_sent_at=LETTER_SENT_AT,
        given_at=GIVEN_AT,
        ip=IP,
        user_agent="Mozilla/5.0 (X11; Linux x86_64)",
        blocks=BLOCKS,
        checked=frozenset({"withdrawal"}),
        texts_sha256=texts_sha256(BLOCKS),
    )
    blobs = LocalBlobStore(settings.storage.path)
    pdf_blob = await blobs.put(consent_pdf.render(record))
    held_blob = await blobs.put(OFFER)
    released = release(key, consent_id)
    released_delivery = new_delivery(
        message_id, PROSPECT, await blobs.put(released), GIVEN_AT, 86400
    )
    async with db.transaction() as session:
        held = {
            "recipient": PROSPECT,
            "letter_id": letter_id,
            "expires_at": (GIVEN_AT + timedelta(days=14)).isoformat(),
            "texts_sha256": texts_sha256(BLOCKS),
        }
        await journal.append(session, [LETTER_HELD.new(held, message_id=message_id)])
    async with db.transaction() as session:
        session.add(
            Message(
                id=message_id,
                sender=AGENT,
                blob="0" * 64,
                size=len(OFFER),
                message_id_header="<offer-1@broker.example>",
                subject="[Exposé] Wohnung mit Balkon",
            )
        )
        await session.flush()
        session.add(
            Link(
                id=link_id,
                token_hash=hashlib.sha256(secrets.token_bytes(32)).hexdigest(),
                kind=LinkKind.LETTER,
                message_id=message_id,
                recipient=PROSPECT,
                language="de",
                expires_at=GIVEN_AT + timedelta(days=14),
            )
        )
        await session.flush()
        session.add(
            Letter(
                id=letter_id,
                message_id=message_id,
                recipient=PROSPECT,
                link_id=link_id,
                letter_blob="1" * 64,
                status=LetterStatus.RELEASED,
                language="de",
                subject="[Exposé] Wohnung mit Balkon",
                blocks=[asdict(b) for b in BLOCKS],
                button="Provisionspflichtig beauftragen und Exposé öffnen",
                texts_sha256=texts_sha256(BLOCKS),
                held_blob=held_blob,
                released_at=GIVEN_AT,
            )
        )
        await session.flush()
        session.add(
            Consent(
                id=consent_id,
                letter_id=letter_id,
                given_at=GIVEN_AT,
                ip=IP,
                user_agent=record.user_agent,
                blocks=[asdict(b) for b in BLOCKS],
                checked=["withdrawal"],
                texts_sha256=texts_sha256(BLOCKS),
                letter_sent_at=LETTER_SENT_AT,
                pdf_blob=pdf_blob,
                released_delivery_id=released_delivery.id,
            )
        )
        session.add(released_delivery)
        await session.flush()
        await journal.append(
            session,
            [
                consent_event(kind, message_id, letter_id, consent_id, released_delivery.id)
                for kind in kinds
            ],
            GIVEN_AT,
        )
    await chain_all(db)  # as a running relay's sequencer does within a second
    return Seeded(consent_id, letter_id, message_id, released, Path(blobs.location(pdf_blob)))


def consent_event(
    kind: str, message_id: str, letter_id: str, consent_id: str, delivery_id: str
) -> journal.NewEvent:
    """The consent.given or letter.released event a release journals for this consent."""
    if kind == "letter.released":
        released = {"consent_id": consent_id, "recipient": PROSPECT}
        return LETTER_RELEASED.new(released, message_id=message_id, delivery_id=delivery_id)
    given = {
        "consent_id": consent_id,
        "letter_id": letter_id,
        "recipient": PROSPECT,
        "ip": IP,
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "texts_sha256": texts_sha256(BLOCKS),
        "checked": ["withdrawal"],
    }
    return CONSENT_GIVEN.new(given, message_id=message_id)


@pytest.fixture
def settings(tmp_path: Path, dkim_key_file: Path) -> Settings:
    return verification_settings(tmp_path / "blobs", dkim_key_file)


async def run(db: Database, settings: Settings, raw: bytes) -> VerificationReport:
    return await verify_released(db, settings, raw)


def failed(report: VerificationReport) -> dict[str, str]:
    return {name: detail for name, passed, detail in report.checks if not passed}


# -- a genuine release ------------------------------------------------------------------------


async def test_a_genuine_release_verifies(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    seeded = await seed(database, settings, dkim_key)
    report = await run(database, settings, seeded.released)
    assert report.ok, report.lines()
    assert report.consent_id == seeded.consent_id
    assert [name for name, _, _ in report.checks] == [
        "DKIM signature",
        "evidence headers signed",
        "evidence headers",
        "consent in the database",
        "texts hash",
        "journal events",
        "journal chain",
    ]
    lines = report.lines()
    assert lines[0] == f"OK: consent {seeded.consent_id} is genuine and matches the journal"
    assert all(line.startswith("✓ ") for line in lines[1:])
    assert f"valid signature by d={DKIM_DOMAIN} s={DKIM_SELECTOR}" in lines[1]
    assert "consent.given #2" in lines[6] and "letter.released #3" in lines[6]
    assert lines[7] == "✓ journal chain: 3 events, chain intact"


async def test_a_release_saved_with_unix_line_ends_verifies(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    seeded = await seed(database, settings, dkim_key)
    report = await run(database, settings, seeded.released.replace(b"\r\n", b"\n"))
    assert report.ok, report.lines()


async def test_trace_fields_added_in_transit_do_not_matter(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    seeded = await seed(database, settings, dkim_key)
    received = b"Received: from relay.broker.example by mx.example.com; Mon, 23 Nov 2026\r\n"
    report = await run(database, settings, received + seeded.released)
    assert report.ok, report.lines()


async def test_a_copy_signed_on_delivery_verifies(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    """The path real releases take: evidence stamped on the held original, signed by
    gateway.mail.outgoing.prepare when the delivery worker sends it."""
    seeded = await seed(database, settings, dkim_key)
    stamped = remove_fields(seeded.released, ["DKIM-Signature"])
    message = Message(
        id=seeded.message_id,
        sender=AGENT,
        blob="0" * 64,
        size=len(stamped),
        message_id_header="<offer-1@broker.example>",
        received_at=GIVEN_AT,
        helo="agent-laptop",
        peer="192.0.2.10",
        protocol="ESMTPSA",
    )
    signer = outgoing.Signer({DKIM_DOMAIN: dkim_key})
    sent = outgoing.prepare(stamped, message, "relay.broker.example", signer)
    report = await run(database, settings, sent)
    assert report.ok, report.lines()


# -- tampering --------------------------------------------------------------------------------

Tamper = Callable[[Database, Seeded, dkim.DkimKey], Awaitable[bytes]]


async def _changed_ip(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    assert f"ip={IP};".encode() in seeded.released
    return seeded.released.replace(f"ip={IP};".encode(), b"ip=203.0.113.8;")


async def _changed_body(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    return seeded.released.replace(b"mit Balkon.", b"mit Balkan.")


async def _added_consent_header(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    forged = evidence_fields(
        seeded.consent_id, GIVEN_AT, "198.51.100.1", texts_sha256(BLOCKS), LETTER_SENT_AT
    )[0]
    return forged + seeded.released


async def _removed_letter_sent(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    return remove_fields(seeded.released, [LETTER_SENT_HEADER])


async def _unknown_consent(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    return release(key, new_id())


async def _stored_hash_differs(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    async with db.transaction() as session:
        await session.execute(
            update(Consent).where(Consent.id == seeded.consent_id).values(texts_sha256="f" * 64)
        )
    return seeded.released


async def _stored_texts_changed(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    changed = [asdict(b) for b in BLOCKS]
    changed[1]["text"] = "Provision 7,14 %."
    async with db.transaction() as session:
        await session.execute(
            update(Consent).where(Consent.id == seeded.consent_id).values(blocks=changed)
        )
    return seeded.released


async def _broken_chain(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    async with db.transaction() as session:
        await session.execute(update(Event).where(Event.seq == 1).values(data={"size": 2}))
    return seeded.released


async def _not_oversigned(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    return release(key, seeded.consent_id, oversign=False)


async def _unsigned(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    return (
        b"".join(
            evidence_fields(seeded.consent_id, GIVEN_AT, IP, texts_sha256(BLOCKS), LETTER_SENT_AT)
        )
        + OFFER
    )


async def _other_key(db: Database, seeded: Seeded, key: dkim.DkimKey) -> bytes:
    other = dkim.DkimKey(DKIM_DOMAIN, DKIM_SELECTOR, dkim.generate_private_key())
    return release(other, seeded.consent_id)


# name -> (tamper, the verdict's reason, the checks that fail)
TAMPERING: dict[str, tuple[Tamper, str, set[str]]] = {
    "an IP address changed in the evidence header": (
        _changed_ip,
        "the DKIM signature does not verify: a signed header field was changed after signing",
        {"DKIM signature", "consent in the database"},
    ),
    "a body byte changed": (
        _changed_body,
        "the body was changed after signing (DKIM body hash mismatch)",
        {"DKIM signature"},
    ),
    "a second consent header added on top": (
        _added_consent_header,
        f"the DKIM signature does not verify: {CONSENT_HEADER} was added after signing",
        {"DKIM signature", "evidence headers signed", "evidence headers"},
    ),
    "an evidence header removed": (
        _removed_letter_sent,
        f"the DKIM signature does not verify: {LETTER_SENT_HEADER} was removed after signing",
        {"DKIM signature", "evidence headers signed", "evidence headers"},
    ),
    "a consent id the database does not know": (
        _unknown_consent,
        "is not in the database",
        {"consent in the database"},
    ),
    "a stored hash that differs": (
        _stored_hash_differs,
        "differs from the header: texts hash",
        {"consent in the database", "texts hash"},
    ),
    "stored texts changed": (
        _stored_texts_changed,
        "hash to",
        {"texts hash"},
    ),
    "a broken journal chain": (
        _broken_chain,
        "the journal's hash chain is broken at event 1: content does not match its hash",
        {"journal chain"},
    ),
    "evidence signed but not oversigned": (
        _not_oversigned,
        f"{CONSENT_HEADER} occurs 1 time(s) and is listed 1 time(s) in h=",
        {"evidence headers signed"},
    ),
    "no signature of ours": (
        _unsigned,
        f"no DKIM signature by a configured domain ({DKIM_DOMAIN}); found: none",
        {"DKIM signature", "evidence headers signed"},
    ),
    "signed with another key": (
        _other_key,
        "or another key made it",
        {"DKIM signature"},
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
async def test_tampering_is_found_with_its_reason(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey, case: str
) -> None:
    tamper, reason, failing = TAMPERING[case]
    seeded = await seed(database, settings, dkim_key)
    report = await run(database, settings, await tamper(database, seeded, dkim_key))
    assert not report.ok
    first = report.lines()[0]
    assert first.startswith("NOT OK: "), first
    assert reason in first, report.lines()
    assert set(failed(report)) == failing, report.lines()


async def test_a_changed_ip_is_also_named_against_the_database(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    seeded = await seed(database, settings, dkim_key)
    report = await run(database, settings, await _changed_ip(database, seeded, dkim_key))
    assert failed(report)["consent in the database"] == (
        f"consent {seeded.consent_id} differs from the header:"
        f" IP address 203.0.113.8 in the header, {IP} recorded"
    )


async def test_missing_journal_events_are_named(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    seeded = await seed(database, settings, dkim_key, kinds=("consent.given",))
    report = await run(database, settings, seeded.released)
    assert report.lines()[0] == (
        f"NOT OK: the journal has no letter.released event for consent {seeded.consent_id}"
    )
    assert set(failed(report)) == {"journal events"}


async def test_a_key_under_another_selector_is_named(
    database: Database, tmp_path: Path, dkim_key_file: Path, dkim_key: dkim.DkimKey
) -> None:
    settings = Settings.model_validate(
        {
            "storage": {"path": str(tmp_path / "blobs")},
            "dkim": {DKIM_DOMAIN: {"selector": "s2027", "key_file": str(dkim_key_file)}},
        }
    )
    seeded = await seed(database, settings, dkim_key)
    report = await run(database, settings, seeded.released)
    assert report.reason == (
        f"signed by d={DKIM_DOMAIN} with selector '{DKIM_SELECTOR}', but the configured key"
        " is selector 's2027'"
    )


# -- the commands -----------------------------------------------------------------------------


def dkim_config(key_file: Path) -> str:
    return f'[dkim."{DKIM_DOMAIN}"]\nselector = "{DKIM_SELECTOR}"\nkey_file = "{key_file}"\n'


@pytest.fixture
async def cli_setup(
    tmp_path: Path, dkim_key_file: Path, dkim_key: dkim.DkimKey
) -> tuple[Path, Seeded]:
    config = write_config(tmp_path / "cli", extra=dkim_config(dkim_key_file))
    settings = verification_settings(config.parent / "blobs", dkim_key_file)
    db = Database.connect(sqlite_url(config))
    try:
        await db.upgrade()
        seeded = await seed(db, settings, dkim_key)
    finally:
        await db.close()
    return config, seeded


async def test_sealrelay_verify_file(tmp_path: Path, cli_setup: tuple[Path, Seeded]) -> None:
    config, seeded = cli_setup
    files = tmp_path / "files"
    files.mkdir()
    genuine = files / "released.eml"
    genuine.write_bytes(seeded.released)
    tampered = files / "tampered.eml"
    tampered.write_bytes(seeded.released.replace(b"mit Balkon.", b"mit Balkan."))
    garbage = files / "photo.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not a message")
    mbox = files / "mbox.eml"
    mbox.write_bytes(b"From agent@broker.example Mon Nov 23 14:05:09 2026\n" + seeded.released)

    ok, both, bad, unreadable, missing, nothing, from_line = await asyncio.gather(
        sealrelay("verify", str(genuine), "-c", str(config)),
        sealrelay("verify", "--journal", str(genuine), "-c", str(config)),
        sealrelay("verify", str(tampered), "-c", str(config)),
        sealrelay("verify", str(garbage), "-c", str(config)),
        sealrelay("verify", str(files / "nowhere.eml"), "-c", str(config)),
        sealrelay("verify", "-c", str(config)),
        sealrelay("verify", str(mbox), "-c", str(config)),
    )
    assert ok.code == 0, ok
    lines = ok.out.splitlines()
    assert lines[0] == f"OK: consent {seeded.consent_id} is genuine and matches the journal"
    assert len(lines) == 8 and all(line.startswith("✓ ") for line in lines[1:])

    assert both.code == 0, both
    assert both.out.splitlines()[-1] == "journal OK: 3 events, chain intact"

    assert bad.code == 1, bad
    bad_lines = bad.out.splitlines()
    assert bad_lines[0] == "NOT OK: the body was changed after signing (DKIM body hash mismatch)"
    assert bad_lines[1].startswith("✗ DKIM signature: ")
    assert "✓ journal chain: 3 events, chain intact" in bad_lines

    assert unreadable.code == 2, unreadable
    assert (
        unreadable.error_line
        == f"{garbage} is not a mail message: it does not start with a header field"
    )
    assert missing.code == 2, missing
    assert missing.error_line.startswith(f"cannot read {files / 'nowhere.eml'}: ")
    assert nothing.code == 2, nothing
    assert "say what to verify" in nothing.err
    assert from_line.code == 0, from_line


async def test_sealrelay_verify_reports_a_broken_journal(
    tmp_path: Path, cli_setup: tuple[Path, Seeded]
) -> None:
    config, seeded = cli_setup
    genuine = tmp_path / "released.eml"
    genuine.write_bytes(seeded.released)
    db = Database.connect(sqlite_url(config))
    try:
        async with db.transaction() as session:
            await session.execute(update(Event).where(Event.seq == 1).values(data={}))
    finally:
        await db.close()
    result = await sealrelay("verify", "--journal", str(genuine), "-c", str(config))
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == (
        "NOT OK: the journal's hash chain is broken at event 1: content does not match its hash"
    )
    assert "✓ journal events: consent.given #2" in result.out
    assert lines[-1] == (
        "journal NOT OK: event 1 content does not match its hash (0 events verified before it)"
    )


async def test_sealrelay_evidence(cli_setup: tuple[Path, Seeded]) -> None:
    config, seeded = cli_setup
    known, unknown = await asyncio.gather(
        sealrelay("evidence", seeded.consent_id, "-c", str(config)),
        sealrelay("evidence", "0123456789abcdef0123", "-c", str(config)),
    )
    assert known.code == 0, known
    out = known.out
    rows = {
        line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip()
        for line in out.splitlines()
        if not line.startswith(" ")
    }
    assert rows["consent"] == seeded.consent_id
    assert rows["letter"].startswith(f"{seeded.letter_id} (released, language de) of message")
    assert rows["recipient"] == PROSPECT
    assert rows["subject"] == "[Exposé] Wohnung mit Balkon"
    assert rows["agent"] == AGENT
    assert rows["consent given"] == (
        "2026-11-23 14:05:09 UTC (2026-11-23 15:05:09 CET, Europe/Berlin)"
    )
    assert rows["IP address"] == IP
    assert rows["user agent"] == "Mozilla/5.0 (X11; Linux x86_64)"
    assert rows["texts"] == f"sha256:{texts_sha256(BLOCKS)} (the stored texts hash to it)"
    assert rows["boxes"] == "☒ withdrawal: Erhalten."
    assert "☐ terms: Ich beauftrage." in out
    assert "consent.given" in rows["journal"]
    assert "letter.released" in out
    assert rows["PDF"] == str(seeded.pdf_path)
    assert seeded.pdf_path.read_bytes().startswith(b"%PDF-")

    assert unknown.code == 1
    assert unknown.out == ""
    assert unknown.error_line == "Error: no consent with id '0123456789abcdef0123'"


async def test_sealrelay_verify_blobs_names_each_blob_the_database_needs_and_lacks(
    cli_setup: tuple[Path, Seeded],
) -> None:
    """After a restore from a blob copy older than the database, say: the seed names an
    original and a letter by digests no store holds, then the consent's PDF goes too."""
    config, seeded = cli_setup
    before = await sealrelay("verify", "--blobs", "-c", str(config))
    lost = [
        f"blob missing: {'0' * 64} named by messages.blob",
        f"blob missing: {'1' * 64} named by letters.letter_blob",
    ]
    assert before.code == 1
    assert [line.split(" (kept ")[0] for line in before.out.splitlines()[:-1]] == lost
    assert before.out.splitlines()[-1].startswith("blobs NOT OK: 2 of ")
    pdf = seeded.pdf_path.name
    seeded.pdf_path.unlink()
    after = await sealrelay("verify", "--blobs", "--journal", "-c", str(config))
    assert after.code == 1
    assert f"blob missing: {pdf} named by consents.pdf_blob (kept evidence:" in after.out
    assert "journal OK: " in after.out and "blobs NOT OK: 3 of " in after.out


async def keep_in_the_database(db: Database, files: LocalBlobStore, data: bytes) -> str:
    """Move a blob from the files to the inline table, where the intake keeps a small one."""
    digest = hashlib.sha256(data).hexdigest()
    await group_commit.insert(db, [], [], datetime.now(UTC), {digest: data})
    await files.delete(digest)
    return digest


async def test_the_evidence_says_a_blob_held_in_the_database_is_there(
    database: Database, settings: Settings, dkim_key: dkim.DkimKey
) -> None:
    """Not a file name where no file is: the table and the digest."""
    seeded = await seed(database, settings, dkim_key)
    files = LocalBlobStore(settings.storage.path)
    held = await keep_in_the_database(database, files, OFFER)
    found = await consent_evidence(
        database, InlineBlobStore(database, files, 64 * 1024), seeded.consent_id
    )
    assert found is not None
    where = {file.label: (file.location, file.present) for file in found.files}
    assert where["held original"] == (f"database table inline_blobs, digest {held}", True)
    assert where["consent PDF"] == (str(seeded.pdf_path), True)


async def test_sealrelay_evidence_names_the_table_of_a_small_original(
    cli_setup: tuple[Path, Seeded],
) -> None:
    config, seeded = cli_setup
    db = Database.connect(sqlite_url(config))
    try:
        files = LocalBlobStore(config.parent / "blobs")
        held = await keep_in_the_database(db, files, OFFER)
    finally:
        await db.close()
    result = await sealrelay("evidence", seeded.consent_id, "-c", str(config))
    assert result.code == 0, result
    rows = {
        line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip()
        for line in result.out.splitlines()
        if not line.startswith(" ")
    }
    assert rows["held original"] == f"database table inline_blobs, digest {held}"
    assert rows["PDF"] == str(seeded.pdf_path)
