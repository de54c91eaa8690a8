"""`sealrelay verify` and `sealrelay evidence`: check and show a consent's evidence."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from gateway.config import Settings
from gateway.letters import verification
from gateway.store import blob_audit, journal
from gateway.store.blob_audit import BlobAudit
from gateway.store.db import Database
from sealrelay.commands.common import config_option, run, settings_for


@click.command()
@config_option
@click.option("--journal", "check_journal", is_flag=True, help="Check the journal's hash chain.")
@click.option(
    "--blobs",
    "check_blobs",
    is_flag=True,
    help="Check that the blob store holds every blob the database still needs.",
)
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def verify(config: Path | None, check_journal: bool, check_blobs: bool, file: Path | None) -> None:
    """Check evidence: a released original FILE.eml, the journal's hash chain, the blobs.

    FILE.eml is checked offline against the configured DKIM key, the consent in the database
    and the journal. --blobs looks up every original, linked file and piece of evidence the
    retention still keeps (after a restore, say). Exit status: 0 OK, 1 NOT OK, 2 the file
    cannot be read as a message.
    """
    if not check_journal and not check_blobs and file is None:
        raise click.UsageError("say what to verify: FILE.eml, --journal, --blobs, or several")
    raw = _read_message(file) if file is not None else None
    settings = settings_for(config)

    async def check(
        db: Database,
    ) -> tuple[
        verification.VerificationReport | None, journal.ChainReport | None, BlobAudit | None
    ]:
        report = None
        if raw is not None:
            report = await verification.verify_released(db, settings, raw)
        chain = None
        if check_journal:
            chain = await journal.verify_database(db)
        return report, chain, await _audit_blobs(settings, db) if check_blobs else None

    report, chain, blobs = run(check, config)
    ok = True
    if report is not None:
        for line in report.lines():
            click.echo(line)
        ok = report.ok
    if chain is not None:
        if chain.ok:
            click.echo(f"journal OK: {chain.events} events, chain intact")
        else:
            click.echo(
                f"journal NOT OK: event {chain.broken_at} {chain.reason}"
                f" ({chain.events} events verified before it)"
            )
            ok = False
        if chain.lag.unchained:
            click.echo(_lag_line(chain.lag, datetime.now(UTC)))
    if blobs is not None:
        for gone in blobs.missing:
            click.echo(f"blob missing: {gone.digest} named by {gone.column} (kept {gone.kept})")
        if blobs.missing:
            click.echo(f"blobs NOT OK: {len(blobs.missing)} of {blobs.checked} needed are missing")
            ok = False
        else:
            click.echo(f"blobs OK: all {blobs.checked} the database still needs are stored")
    if not ok:
        sys.exit(1)


async def _audit_blobs(settings: Settings, db: Database) -> BlobAudit:
    from sealrelay.serve import blob_horizon, blob_store

    blobs = blob_store(settings, db)
    try:
        return await blob_audit.audit(db, blobs, blob_horizon(settings, datetime.now(UTC)))
    finally:
        await blobs.close()


def _lag_line(lag: journal.Lag, now: datetime) -> str:
    """The events a sequencer has still to chain: `verify` proves nothing about them yet."""
    count = f"{lag.unchained} event{'s' if lag.unchained != 1 else ''}"
    oldest = f"{lag.oldest:%Y-%m-%d %H:%M:%S} UTC, " if lag.oldest else ""
    return (
        f"journal: {count} not chained yet, the oldest written {oldest}{lag.age(now):.0f} s"
        " ago (a running relay chains them within database.chain_interval)"
    )


def _read_message(file: Path) -> bytes:
    """The bytes of a saved message; exit 2 with one line when there is none to check."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        click.echo(f"cannot read {file}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    if raw.startswith(b"From "):  # an mbox separator line some clients save first
        raw = raw.partition(b"\n")[2]
    if not re.match(rb"[!-9;-~]+[ \t]*:", raw):
        click.echo(f"{file} is not a mail message: it does not start with a header field", err=True)
        sys.exit(2)
    return raw


@click.command()
@config_option
@click.argument("consent_id")
def evidence(config: Path | None, consent_id: str) -> None:
    """Show the stored record of a consent, its journal events and its PDF."""
    from sealrelay.serve import blob_store

    settings = settings_for(config)

    async def look_up(db: Database) -> verification.ConsentEvidence | None:
        blobs = blob_store(settings, db)
        try:
            return await verification.consent_evidence(db, blobs, consent_id)
        finally:
            await blobs.close()

    found = run(look_up, config)
    if found is None:
        raise click.ClickException(f"no consent with id {consent_id!r}")
    consent, letter, message = found.consent, found.letter, found.message
    zone = ZoneInfo(settings.branding.timezone)

    def moment(at: datetime) -> str:
        local = at.astimezone(zone)
        return f"{at:%Y-%m-%d %H:%M:%S} UTC ({local:%Y-%m-%d %H:%M:%S %Z}, {zone.key})"

    if found.recomputed_sha256 == consent.texts_sha256:
        texts_note = "the stored texts hash to it"
    elif found.recomputed_sha256 is None:
        texts_note = "THE STORED TEXTS ARE UNREADABLE"
    else:
        texts_note = f"THE STORED TEXTS HASH TO {found.recomputed_sha256}"
    rows: list[tuple[str, list[str]]] = [
        ("consent", [consent.id]),
        (
            "letter",
            [
                f"{letter.id} ({letter.status}, language {letter.language})"
                f" of message {letter.message_id}"
                if letter is not None
                else f"{consent.letter_id} (NOT FOUND)"
            ],
        ),
        ("recipient", [letter.recipient if letter is not None else "?"]),
        ("subject", [letter.subject if letter is not None else "?"]),
        ("agent", [message.sender if message is not None else "?"]),
        ("letter sent", [moment(consent.letter_sent_at)]),
        ("consent given", [moment(consent.given_at)]),
        ("IP address", [consent.ip]),
        ("user agent", [consent.user_agent]),
        ("texts", [f"sha256:{consent.texts_sha256} ({texts_note})"]),
        ("boxes", _boxes(consent.blocks, consent.checked) or ["(none to tick)"]),
        (
            "journal",
            [
                f"{verification.chain_number(event)} {event.at:%Y-%m-%d %H:%M:%S} UTC {event.type}"
                for event in found.events
            ]
            or ["(no events name this consent)"],
        ),
        *(
            (
                "PDF" if file.label == "consent PDF" else file.label,
                [_stored(file)],
            )
            for file in found.files
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, values in rows:
        for index, value in enumerate(values):
            click.echo(f"{label if index == 0 else '':<{width}}  {value}")
    missing = [file.label for file in found.files if not file.present]
    if missing:
        raise click.ClickException(
            f"evidence files missing from the blob store: {', '.join(missing)}"
        )


def _stored(file: verification.EvidenceFile) -> str:
    if file.location is None:
        return f"{file.digest!r} (NOT A BLOB NAME)"
    return f"{file.location}{'' if file.present else ' (MISSING from the blob store)'}"


def _boxes(blocks: list[dict[str, Any]], checked: list[str]) -> list[str]:
    lines = []
    for block in blocks:
        label = block.get("checkbox")
        if label is None:
            continue
        mark = "☒" if block.get("id") in checked else "☐"
        lines.append(f"{mark} {block.get('id')}: {' '.join(str(label).split())}")
    return lines
