"""Evidence outlives the link sweep: held offers, released originals, consent PDFs.

Offers are sent through a running relay (SMTP, worker, web) whose clock the test moves on;
the sweep is the one the relay runs every hour. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import String, select

from gateway.letters.desk import LetterDesk
from gateway.store import blob_columns, sweeper
from gateway.store.models import (
    Base,
    Consent,
    Delivery,
    Letter,
    LetterStatus,
    Message,
    StoredFile,
)
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.letter_site import (
    AGENT,
    PROSPECT,
    Clock,
    LetterSite,
    offer,
    plain_body,
    text_of,
    token_in,
)
from tests.queue_wait import queue_idle
from tests.support import chained, screenshot_dir

GRACE = timedelta(days=7)
OTHER = "omar@example.org"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


async def sweep(site: LetterSite) -> sweeper.SweepReport:
    """One round of the relay's own housekeeping, at the relay's (moved) time."""
    return await site.relay.sweep_once()


async def test_a_held_offer_can_be_released_after_the_link_sweep(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    clock.advance(days=10)  # past the blob grace period, still inside the letter's 14 days
    await sweep(site)

    response = await site.consent(token)
    assert response.status == 303, await response.text()
    letter = await site.letter_row()
    assert letter.status == LetterStatus.RELEASED
    released = await site.sink.expect(3)
    assert any(b"X-Sealrelay-Consent" in m.data for m in released if m.rcpt_tos == [PROSPECT])


async def test_a_released_offer_and_its_pdf_outlive_the_link_sweep(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    clock.advance(days=400)
    await sweep(site)

    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200, body[:300]
    parts = set(re.findall(rf"/l/{token}(/a/[0-9.]+)", body.decode()))
    assert parts, "the offer page lists the floor plan"
    for path in ("/consent.pdf", *parts):
        response, body = await site.get(f"/l/{token}{path}")
        assert response.status == 200, (path, body[:300])
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    assert await site.relay.blobs.exists(consent.pdf_blob)


async def test_evidence_goes_after_its_retention_and_not_before(
    site: LetterSite, clock: Clock
) -> None:
    """Three years counted from the end of the year of the consent or of the expiry
    (§§ 195, 199 BGB), for a released and for a never-consented letter."""
    clock.offset = datetime(2027, 6, 15, 12, tzinfo=UTC) - datetime.now(UTC)
    await site.send_offer(recipient=OTHER)
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    async with site.relay.db.transaction() as session:
        letters = {row.recipient: row for row in (await session.scalars(select(Letter))).all()}
        [consent] = (await session.scalars(select(Consent))).all()
    evidence = (letters[PROSPECT].held_blob, consent.pdf_blob, letters[OTHER].held_blob)

    clock.offset = datetime(2030, 12, 30, tzinfo=UTC) - datetime.now(UTC)
    await sweep(site)
    assert all([await site.relay.blobs.exists(digest) for digest in evidence])

    clock.offset = datetime(2031, 1, 2, tzinfo=UTC) - datetime.now(UTC)
    await sweep(site)
    assert not any([await site.relay.blobs.exists(digest) for digest in evidence])


async def test_a_delivered_mail_goes_after_its_days_and_the_evidence_stays(
    site: LetterSite, clock: Clock
) -> None:
    """The relay's own sweep with the shipped `keep_originals_days` (30): a plain mail's
    original and copy go once delivered and 30 days old; the released offer's evidence and
    every page of it stay, and the journal stays whole."""
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    before = len(site.sink.messages)
    await site.harness.send(offer(subject="Termin am Montag", big=False), recipients=[OTHER])
    await site.sink.expect(before + 1)
    await queue_idle(site.relay.db)
    async with site.relay.db.transaction() as session:
        [plain] = (
            await session.scalars(select(Message).where(Message.subject == "Termin am Montag"))
        ).all()
        copies = list(
            (
                await session.scalars(select(Delivery.blob).where(Delivery.message_id == plain.id))
            ).all()
        )
        [letter] = (await session.scalars(select(Letter))).all()
        [consent] = (await session.scalars(select(Consent))).all()
    assert copies

    clock.advance(days=29)
    await sweep(site)
    assert await site.relay.blobs.exists(plain.blob)

    clock.advance(days=2)
    report = await sweep(site)
    assert report.blobs_deleted >= 1
    assert not await site.relay.blobs.exists(plain.blob)
    assert not any([await site.relay.blobs.exists(digest) for digest in copies])
    for digest in (letter.held_blob, letter.letter_blob, consent.pdf_blob):
        assert await site.relay.blobs.exists(digest)
    for path in ("/offer", "/consent.pdf"):
        response, body = await site.get(f"/l/{token}{path}")
        assert response.status == 200, (path, body[:300])
    assert await site.count(Message, Message.id == plain.id) == 1
    assert (await chained(site.relay.db)).ok


async def test_a_linked_mail_goes_after_its_days_and_its_page_still_names_the_agent(
    site: LetterSite, clock: Clock
) -> None:
    """Its original and copy go at day 31 like any other; the linked file stays while the
    link lives, and the download page names the agent as the intake kept them: the page
    needs no original."""
    await site.harness.send(offer(subject="Unterlagen Grüner Weg"), recipients=[OTHER])
    [copy] = await site.sink.expect(1)
    await queue_idle(site.relay.db)
    [token] = set(re.findall(r"/d/([A-Za-z0-9_-]{43})", plain_body(copy.data)))
    async with site.relay.db.transaction() as session:
        [message] = (await session.scalars(select(Message))).all()
        files = list((await session.scalars(select(StoredFile.sha256))).all())
    assert message.sender_name == "Anna Agent" and files

    clock.advance(days=31)
    await sweep(site)
    assert not await site.relay.blobs.exists(message.blob)
    assert all([await site.relay.blobs.exists(digest) for digest in files])
    response, body = await site.get(f"/d/{token}")
    assert response.status == 200, body[:300]
    assert f"Anna Agent ({AGENT})" in text_of(body)


async def test_a_letter_expired_by_another_instance_cannot_be_consented(
    site: LetterSite, clock: Clock
) -> None:
    """An instance whose clock runs a little behind honours the expiry another recorded."""
    token, _ = await site.send_offer()
    letters = site.relay.letters
    ahead = LetterDesk(letters.settings, letters.db, letters.blobs, letters.notify, clock)
    assert await ahead.expire_due(clock() + timedelta(days=14, seconds=1)) == 1
    response = await site.consent(token)
    assert response.status == 410
    assert await site.count(Consent) == 0
    assert (await site.letter_row()).status == LetterStatus.EXPIRED


async def test_every_column_that_names_a_blob_is_declared(site: LetterSite) -> None:
    """After a real flow (links, a letter, a consent), every column holding a stored blob's
    name is declared in gateway/store/blob_columns.py: the sweeper only keeps what is declared."""
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    await site.sink.expect(3)
    declared = {str(c.column.expression) for c in blob_columns.BLOB_COLUMNS}
    held = {str(column.expression) for column in blob_columns.BLOBS_HELD}
    naming_blobs = set()
    async with site.relay.db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                if not isinstance(column.type, String):
                    continue
                values = (await session.scalars(select(column).distinct())).all()
                if any(
                    [
                        isinstance(v, str) and _DIGEST.match(v) and await site.relay.blobs.exists(v)
                        for v in values
                    ]
                ):
                    naming_blobs.add(f"{table.name}.{column.name}")
    assert naming_blobs - held <= declared, naming_blobs - held - declared
    assert {"letters.held_blob", "consents.pdf_blob"} <= naming_blobs


def test_every_digest_sized_column_is_classified() -> None:
    """A new String(64) column, or one named *blob* or *sha256*, must be declared either as
    naming a blob or as a hash of something else; otherwise the sweeper would not know it."""
    classified = {
        str(c.expression)
        for c in (
            *(b.column for b in blob_columns.BLOB_COLUMNS),
            *blob_columns.HASHES_NAMING_NO_BLOB,
            *blob_columns.BLOBS_HELD,
        )
    }
    candidates = {
        f"{table.name}.{column.name}"
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if (isinstance(column.type, String) and column.type.length == 64)
        or "blob" in column.name
        or "sha256" in column.name
    }
    assert candidates == classified, (candidates - classified, classified - candidates)


# --- a blob lost all the same (a disk, a hand): a clear answer, never a 500 -----------------


async def lose(site: LetterSite, digest: str) -> None:
    assert await site.relay.blobs.exists(digest)
    await site.relay.blobs.delete(digest)


async def test_a_lost_held_offer_gets_a_page_naming_it(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    await lose(site, (await site.letter_row()).held_blob)
    response = await site.consent(token)
    body = await response.text()
    assert response.status == 410, body[:300]
    assert "Villa am See" in body and "nicht mehr gespeichert" in body
    letter = await site.letter_row()
    assert letter.status == LetterStatus.HELD  # nothing was consented or written
    assert await site.count(Consent) == 0


async def test_lost_evidence_files_get_pages_naming_them(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    letter = await site.letter_row()
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    response, body = await site.get(f"/l/{token}/offer")
    parts = set(re.findall(rf"/l/{token}(/a/[0-9.]+)", body.decode()))
    await lose(site, letter.held_blob)
    await lose(site, consent.pdf_blob)
    expected = {
        "/offer": "Das Angebot „Villa am See“ ist hier nicht mehr gespeichert",
        "/consent.pdf": "Das PDF Ihrer Erklärungen zu „Villa am See“ ist hier nicht mehr",
        **dict.fromkeys(parts, "Das Angebot „Villa am See“ ist hier nicht mehr gespeichert"),
    }
    for path, sentence in expected.items():
        response, body = await site.get(f"/l/{token}{path}")
        assert response.status == 410, (path, body[:300])
        assert sentence in body.decode(), path


@dataclass
class Run:
    code: int
    out: str
    err: str


async def sealrelay(*args: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sealrelay"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_sealrelay_evidence_names_lost_files(site: LetterSite, tmp_path: Path) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    await site.sink.expect(3)
    await queue_idle(site.relay.db)  # the signed copy is recorded with its delivery
    letter = await site.letter_row()
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[database]\nurl = "{site.relay.db.engine.url.render_as_string(False)}"\n'
        f'[storage]\npath = "{site.relay.settings.storage.path}"\n'
    )

    whole = await sealrelay("evidence", consent.id, "-c", str(config))
    assert whole.code == 0, whole
    assert "MISSING" not in whole.out

    await lose(site, letter.held_blob)
    await lose(site, consent.pdf_blob)
    lost = await sealrelay("evidence", consent.id, "-c", str(config))
    assert lost.code == 1, lost
    assert "Traceback" not in lost.err
    rows = {line.split("  ", 1)[0]: line for line in lost.out.splitlines()}
    assert "MISSING" in rows["PDF"] and "MISSING" in rows["held original"]
    assert "MISSING" not in rows["released original"]
    assert "MISSING" not in rows["released original, signed as delivered"]
    assert lost.err.strip().splitlines()[-1] == (
        "Error: evidence files missing from the blob store: held original, consent PDF"
    )


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_lost_offer_page_reads_well_on_a_phone(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    await lose(site, (await site.letter_row()).held_blob)
    async_playwright = playwright_api()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport=PHONE, device_scale_factor=2, is_mobile=True, locale="de-DE"
            )
            page = await context.new_page()
            response = await page.goto(f"{site.url}/l/{token}/offer")
            assert response is not None and response.status == 410
            heading = page.get_by_role("heading", name="Nicht mehr verfügbar")
            assert await heading.is_visible()
            text = await page.locator("main").inner_text()
            assert "Das Angebot „Villa am See“ ist hier nicht mehr gespeichert." in text
            assert "Bitte fragen Sie Anna Agent" in text
            assert "<" not in text
            await page.screenshot(
                path=str(screenshot_dir("evidence") / "offer-no-longer-stored.png"),
                full_page=True,
            )
        finally:
            await browser.close()


async def test_a_resent_letter_keeps_its_offer_through_the_link_sweep(
    site: LetterSite, clock: Clock
) -> None:
    """A re-sent letter points at its new link: the held original lives as long as that one."""
    await site.send_offer()
    letter = await site.letter_row()
    count = len(site.sink.messages)
    await site.relay.letters.resend(letter.id, "anna@broker.example")
    await site.sink.expect(count + 1)
    fresh = token_in(site.sink.messages[-1].data, site.url)
    clock.advance(days=10)  # the first link's creation plus the blob grace period
    await sweep(site)
    assert await site.relay.blobs.exists(letter.held_blob)
    assert await site.relay.blobs.exists((await site.letter_row()).letter_blob)
    assert (await site.consent(fresh)).status == 303


async def test_an_offer_released_by_the_agent_stays_evidence(
    site: LetterSite, clock: Clock
) -> None:
    """Without a consent, the retention runs from the link's expiry; the released copy lives
    as long as its delivery, and the signed copy it was delivered as for the retention."""
    await site.send_offer()
    letter = await site.letter_row()
    await site.relay.letters.release_by_agent(letter.id, "anna@broker.example", "by phone")
    # delivered first: a copy in flight is protected by the blob grace period, not by a row,
    # and a clock moved 400 days would put even a blob written a moment ago beyond it
    await queue_idle(site.relay.db)
    clock.advance(days=400)
    await sweep(site)
    assert await site.relay.blobs.exists(letter.held_blob)
    released = await site.relay.letters.released_original(letter.id, "anna@broker.example")
    assert released.signed and b"X-Sealrelay-Released-By-Agent" in released.data
