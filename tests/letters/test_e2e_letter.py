"""End to end: an offer goes out as a registered letter (issue 4's scenario).

Real client -> relay -> recording upstream; consent through the LetterDesk that the web
page calls (the pages themselves are tested in test_letter_pages.py). SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway.letters import consent_pdf
from gateway.letters.desk import ConsentIncomplete, LetterUnknown
from gateway.letters.evidence import parse_evidence
from gateway.letters.verification import verify_released
from gateway.mail import headers
from gateway.store.models import Consent, Delivery, Event, Letter, LetterStatus
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, dkim_dns
from tests.letters.test_consent_pdf import DEJAVU
from tests.letters.test_consent_pdf import text_of as pdf_text_of
from tests.mail import tnef_stream
from tests.support import chained

PROSPECT = "paula@example.com"
OTHER = "omar@example.org"
COLLEAGUE = "ben@broker.example"
PDF = os.urandom(3 * 1024 * 1024)
REQUIRED = {"withdrawal", "early-start", "terms"}
LETTER_LINK = re.compile(r"http://127\.0\.0\.1:8080/l/([A-Za-z0-9_-]{43})")


def offer() -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>, {OTHER}"
    message["Cc"] = COLLEAGUE
    message["Subject"] = "[Exposé] Villa am See"
    message["Message-ID"] = "<offer-villa@broker.example>"
    message.set_content("Guten Tag,\n\nhier ist das Exposé zur Villa am See.\n")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="Expose.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


@pytest.fixture
async def relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory(
        smtp={"max_message_size": 50 * 1024 * 1024},
        policy={"internal_domains": ["broker.example"]},
    )


def text_of(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def send_offer(relay: Harness) -> tuple[bytes, dict[str, bytes]]:
    original = offer()
    await relay.send(original, recipients=[PROSPECT, OTHER, COLLEAGUE])
    copies = {copy.rcpt_tos[0]: copy.data for copy in await relay.sink.expect(3)}
    return original, copies


async def test_offer_is_held_and_released_with_signed_evidence(relay: Harness) -> None:
    started = datetime.now(UTC).replace(microsecond=0)
    original, copies = await send_offer(relay)

    assert copies[COLLEAGUE].endswith(original)
    tokens = {}
    for recipient in (PROSPECT, OTHER):
        letter = copies[recipient]
        assert dkimpy.verify(letter, dnsfunc=dkim_dns(relay.dkim_key))
        fields = headers.fields_of(letter)
        assert headers.addresses(fields, "from") == [AGENT]
        assert headers.decoded(headers.first_value(fields, "subject") or "") == (
            "Ihr angefordertes Exposé: Villa am See"
        )
        text = text_of(letter)
        assert "Muster-Widerrufsformular" in text  # the texts travel in full, inline
        assert "Widerrufsbelehrung" in text
        assert PDF[:64] not in letter and b"Expose.pdf" not in letter
        [tokens[recipient]] = set(LETTER_LINK.findall(text))

    desk = relay.relay.letters
    with pytest.raises(ConsentIncomplete) as incomplete:
        await desk.release(tokens[PROSPECT], {"withdrawal"}, "127.0.0.1", "pytest")
    assert {b.id for b in incomplete.value.missing} == {"early-start", "terms"}
    with pytest.raises(LetterUnknown):
        await desk.release("x" * 43, REQUIRED, "127.0.0.1", "pytest")

    release = await desk.release(tokens[PROSPECT], REQUIRED, "127.0.0.1", "Mozilla/5.0 pytest")
    assert not release.already
    arrived = await relay.sink.expect(5)
    released = [
        m.data for m in arrived if m.rcpt_tos == [PROSPECT] and b"X-Sealrelay-Consent" in m.data
    ]
    notices = [m for m in arrived if m.rcpt_tos == [AGENT]]
    assert len(released) == 1 and len(notices) == 1
    copy = released[0]

    # The original, tag removed, large attachment linked, evidence on top, signed over it.
    evidence = parse_evidence(copy)
    assert evidence.ip == "127.0.0.1"
    assert evidence.consent_id == release.consent.id
    assert started <= evidence.given_at <= datetime.now(UTC)
    fields = headers.fields_of(copy)
    assert headers.first_value(fields, "subject") == "Villa am See"
    assert headers.first_value(fields, "message-id") == "<offer-villa@broker.example>"
    assert "hier ist das Exposé zur Villa am See" in text_of(copy)
    assert "/d/" in text_of(copy) and PDF[:64] not in copy
    dns = dkim_dns(relay.dkim_key)
    assert dkimpy.verify(copy, dnsfunc=dns)
    signature = headers.first_value(fields, "dkim-signature") or ""
    assert "x-sealrelay-consent:x-sealrelay-consent" in signature.lower().replace(" ", "")
    tampered = copy.replace(b"ip=127.0.0.1", b"ip=127.0.0.2")
    assert not dkimpy.verify(tampered, dnsfunc=dns)
    forged = b"X-Sealrelay-Consent: at=2026-01-01T00:00:00Z; ip=10.0.0.1\r\n" + copy
    assert not dkimpy.verify(forged, dnsfunc=dns)

    report = await verify_released(relay.relay.db, relay.settings, copy)
    assert report.ok, report.lines()
    report = await verify_released(relay.relay.db, relay.settings, tampered)
    assert not report.ok

    notice = email.message_from_bytes(notices[0].data, policy=email.policy.default)
    assert notices[0].mail_from in ("", "<>")  # the null sender
    [pdf] = [p for p in notice.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert pdf.get_payload(decode=True).startswith(b"%PDF")  # type: ignore[union-attr]

    again = await desk.release(tokens[PROSPECT], REQUIRED, "10.9.9.9", "another")
    assert again.already and again.consent.id == release.consent.id

    assert (await chained(relay.relay.db)).ok
    async with relay.relay.db.transaction() as session:
        letters = {row.recipient: row for row in (await session.scalars(select(Letter))).all()}
        events = [e.type for e in (await session.scalars(select(Event).order_by(Event.id)))]
    assert letters[PROSPECT].status == LetterStatus.RELEASED
    assert letters[OTHER].status == LetterStatus.HELD
    assert events.count("letter.held") == 2
    assert events.count("consent.given") == 1
    assert events.count("letter.released") == 1


async def test_a_letter_to_a_utf8_address_is_held_and_released_to_it(relay: Harness) -> None:
    """SMTPUTF8 end to end (RFC 6531): the letter and, after the consent, the signed original
    reach the mailbox as the agent wrote it, and the evidence verifies."""
    relay.sink.smtputf8 = True
    prospect = "jörg@bücher.example"
    original = offer().replace(f"Paula Prospect <{PROSPECT}>".encode(), prospect.encode())
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        await client.sendmail(AGENT, [prospect], original, mail_options=["SMTPUTF8"])
    [letter] = await relay.sink.expect(1)
    assert letter.rcpt_tos == [prospect] and letter.smtputf8
    [token] = set(LETTER_LINK.findall(text_of(letter.data)))

    await relay.relay.letters.release(token, REQUIRED, "127.0.0.1", "Mozilla/5.0 pytest")
    arrived = await relay.sink.expect(3)  # and the agent's notice
    [released] = [m for m in arrived if b"X-Sealrelay-Consent" in m.data]
    assert released.rcpt_tos == [prospect] and released.smtputf8
    assert dkimpy.verify(released.data, dnsfunc=dkim_dns(relay.dkim_key))
    report = await verify_released(relay.relay.db, relay.settings, released.data)
    assert report.ok, report.lines()


async def test_concurrent_consents_release_once(relay: Harness) -> None:
    _, copies = await send_offer(relay)
    [token] = set(LETTER_LINK.findall(text_of(copies[OTHER])))
    results = await asyncio.gather(
        *(
            relay.relay.letters.release(token, REQUIRED, f"127.0.0.{i}", "pytest")
            for i in range(1, 6)
        )
    )
    assert sum(not r.already for r in results) == 1
    assert len({r.consent.id for r in results}) == 1
    await relay.sink.expect(5)
    async with relay.relay.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Consent)) == 1
        released_rows = await session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.recipient == OTHER)
        )
    assert released_rows == 2  # the letter and the one released original
    released = [
        m for m in relay.sink.messages if m.rcpt_tos == [OTHER] and b"X-Sealrelay-Consent" in m.data
    ]
    assert len(released) == 1


async def test_mail_is_taken_while_a_consent_pdf_is_drawn(
    relay: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PDF is drawn before the transaction that records the consent: a write of the
    relay's (here another message taken) and the letter's row itself stay free meanwhile.
    The old order held SQLite's write lock, and PostgreSQL's lock on the letter, across it."""
    _, copies = await send_offer(relay)
    [token] = set(LETTER_LINK.findall(text_of(copies[OTHER])))
    loop = asyncio.get_running_loop()
    drawing, may_finish = asyncio.Event(), threading.Event()
    render = consent_pdf.render

    def held_render(*args: Any) -> bytes:
        loop.call_soon_threadsafe(drawing.set)
        assert may_finish.wait(30), "the test never let the PDF finish"
        return render(*args)

    monkeypatch.setattr(consent_pdf, "render", held_render)
    release = asyncio.create_task(relay.relay.letters.release(token, REQUIRED, "127.0.0.9", "t"))
    try:
        await asyncio.wait_for(drawing.wait(), 30)
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = AGENT, PROSPECT, "Meanwhile"
        mail.set_content("Taken while the consent PDF is drawn.")
        await asyncio.wait_for(relay.send(mail, recipients=[PROSPECT]), 10)
        async with relay.relay.db.transaction() as session:
            locked = select(Letter).where(Letter.recipient == OTHER).with_for_update(nowait=True)
            assert (await asyncio.wait_for(session.execute(locked), 10)).first() is not None
    finally:
        may_finish.set()
    assert not (await release).already


async def test_the_consent_pdf_in_the_configured_font_shows_every_letter(
    relay_factory: StartRelay,
) -> None:
    """`[letter] pdf_font`: the PDF the agent gets and the one kept as evidence show a
    Polish company name as written (the built-in fonts would show `?d?`)."""
    company = "Łódź Nieruchomości Sp. z o.o."
    relay = await relay_factory(
        smtp={"max_message_size": 50 * 1024 * 1024},
        branding={"company_name": company},
        letter={"pdf_font": str(DEJAVU)},
    )
    await relay.send(offer(), recipients=[PROSPECT])
    [letter] = await relay.sink.expect(1)
    [token] = set(LETTER_LINK.findall(text_of(letter.data)))
    release = await relay.relay.letters.release(token, REQUIRED, "127.0.0.1", "pytest")
    notices = [m for m in await relay.sink.expect(3) if m.rcpt_tos == [AGENT]]
    notice = email.message_from_bytes(notices[0].data, policy=email.policy.default)
    [pdf] = [p for p in notice.iter_attachments() if p.get_content_type() == "application/pdf"]
    sent = pdf.get_payload(decode=True)
    assert isinstance(sent, bytes) and company in pdf_text_of(sent)
    kept = await relay.relay.letters.consent_pdf(release.letter.id, "admin@broker.example")
    assert kept == sent


async def test_terms_pdf_travels_with_the_letter_and_the_archive_gets_copies(
    relay_factory: StartRelay, tmp_path: Path
) -> None:
    terms = tmp_path / "agb.pdf"
    terms.write_bytes(b"%PDF-1.4 terms of Musterimmobilien")
    archive = "archiv@broker.example"
    relay = await relay_factory(
        smtp={"max_message_size": 50 * 1024 * 1024},
        letter={"terms_pdf": {"de": str(terms)}, "archive_bcc": archive},
    )
    await relay.send(offer(), recipients=[PROSPECT])
    [letter] = await relay.sink.expect(1)
    assert sorted(letter.rcpt_tos) == sorted([PROSPECT, archive])  # the letter as sent
    parsed = email.message_from_bytes(letter.data, policy=email.policy.default)
    [attached] = list(parsed.iter_attachments())
    assert attached.get_filename() == "AGB.pdf"
    assert attached.get_payload(decode=True) == terms.read_bytes()
    [token] = set(LETTER_LINK.findall(text_of(letter.data)))

    await relay.relay.letters.release(token, REQUIRED, "127.0.0.1", "pytest")
    # Copies sharing a blob leave together: original to prospect and archive, notice to
    # agent and archive.
    arrived = await relay.sink.expect(3)
    to_archive = [m.data for m in arrived if archive in m.rcpt_tos]
    assert len(to_archive) == 3
    assert any(b"X-Sealrelay-Consent" in data for data in to_archive)
    assert any(b"application/pdf" in data for data in to_archive)


async def test_an_offer_from_outlook_in_rich_text_is_released_with_its_files(
    relay: Harness,
) -> None:
    """Outlook puts the offer's PDF inside winmail.dat; the prospect who consented gets the
    PDF itself, in the original the evidence is signed over."""
    small_pdf = b"%PDF-1.7\n" + os.urandom(300_000)
    winmail = tnef_stream.stream(
        [tnef_stream.Attachment(small_pdf, title="EXPOSE~1.PDF", long_filename="Exposé Villa.pdf")]
    )
    sent = tnef_stream.outlook_mail(
        winmail,
        sender=f"Anna Agent <{AGENT}>",
        to=PROSPECT,
        subject="[Exposé] Villa am See",
        text="Guten Tag,\n\nhier ist das Exposé zur Villa am See.\n",
    )
    await relay.send(sent, recipients=[PROSPECT])
    [letter] = await relay.sink.expect(1)
    assert b"winmail.dat" not in letter.data and small_pdf[:64] not in letter.data
    [token] = set(LETTER_LINK.findall(text_of(letter.data)))

    await relay.relay.letters.release(token, REQUIRED, "127.0.0.1", "Mozilla/5.0 pytest")
    arrived = await relay.sink.expect(3)  # and the agent's notice
    [released] = [m.data for m in arrived if b"X-Sealrelay-Consent" in m.data]
    parsed = email.message_from_bytes(released, policy=email.policy.default)
    files = {
        part.get_filename(): part.get_payload(decode=True) for part in parsed.iter_attachments()
    }
    assert files == {"Exposé Villa.pdf": small_pdf}
    assert dkimpy.verify(released, dnsfunc=dkim_dns(relay.dkim_key))
    report = await verify_released(relay.relay.db, relay.settings, released)
    assert report.ok, report.lines()
