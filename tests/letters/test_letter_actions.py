"""What agents do to registered letters, through a running relay (SMTP in, the worker, the web
pages), on SQLite and PostgreSQL: re-send with a fresh link, release without consent, preview,
the evidence for a lawyer, and what a link scanner's visit leaves."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from gateway.agent_actions import InvalidRequest, UnknownTarget, WrongState
from gateway.letters.evidence import parse_evidence
from gateway.links.tokens import Closed
from gateway.mail import headers
from gateway.mail.evidence_headers import CONSENT_HEADER, RELEASED_BY_AGENT_HEADER
from gateway.store.models import Consent, Delivery, Event, Letter, LetterStatus, Link
from tests.letter_site import PROSPECT, REQUIRED, Clock, LetterSite, offer, text_of, token_in
from tests.queue_wait import queue_idle

ANNA = "anna@broker.example"
SAFE_LINKS = "Mozilla/5.0 (compatible; Microsoft Office/16.0; SafeLinks)"


async def journal_size(site: LetterSite) -> int:
    async with site.relay.db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Event)) or 0)


async def state(site: LetterSite) -> tuple[int, int, int, str, str]:
    """What an action refused must leave as it was: events, deliveries, links, the letter;
    read once the worker has delivered what was queued, so it adds no event meanwhile."""
    await queue_idle(site.relay.db)
    letter = await site.letter_row()
    return (
        await journal_size(site),
        await site.count(Delivery),
        await site.count(Link),
        letter.status,
        letter.link_id,
    )


async def test_resend_sends_the_same_texts_with_a_fresh_link(site: LetterSite) -> None:
    token, first = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    letter = await site.letter_row()
    before = await state(site)
    for bad, error in (("nope", UnknownTarget), (letter.id, InvalidRequest)):
        with pytest.raises(error):
            await desk.resend(bad, ANNA if bad == "nope" else " ")
    assert await state(site) == before

    count = len(site.sink.messages)
    delivery = await desk.resend(letter.id, ANNA)
    await site.sink.expect(count + 1)
    [again] = [m for m in site.sink.messages[count:] if m.rcpt_tos == [PROSPECT]]
    fresh = token_in(again.data, site.url)
    assert fresh != token and delivery.recipient == PROSPECT
    # the same snapshot of texts, in full, with the new link
    shown = text_of(again.data)
    assert fresh in shown and token not in shown
    for block in letter.blocks:
        assert block["title"] in shown and block["title"] in text_of(first.data)
    assert "Muster-Widerrufsformular" in shown

    resent = await site.letter_row()
    assert resent.id == letter.id and resent.status == LetterStatus.HELD
    assert resent.texts_sha256 == letter.texts_sha256 and resent.blocks == letter.blocks
    assert resent.link_id != letter.link_id
    [event] = await site.events("letter.resent")
    assert event.data["actor"] == ANNA and event.data["previous_link_id"] == letter.link_id
    assert event.delivery_id == delivery.id
    [revoked] = await site.events("link.revoked")
    assert revoked.data["link_id"] == letter.link_id and revoked.data["kind"] == "letter"

    # the old link: access ended, in the letter's language, with no offer of a new link
    response, body = await site.get(f"/l/{token}")
    assert response.status == 410
    page = body.decode()
    assert "Zugang beendet" in page and "abgelaufen" not in page and "/renew" not in page
    csrf_page, _ = await site.get(f"/l/{fresh}")
    assert csrf_page.status == 200
    response, _ = await site.post(f"/l/{token}", {"csrf": "0" * 64, **dict.fromkeys(REQUIRED, "y")})
    assert response.status == 410
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": "0" * 64})
    assert response.status == 410
    assert await site.events("letter.renewal_requested") == []
    assert await site.count(Consent) == 0
    # the new one consents and releases as the first would have
    assert (await site.consent(fresh)).status == 303
    assert (await site.letter_row()).status == LetterStatus.RELEASED

    before = await state(site)
    with pytest.raises(WrongState, match="released"):
        await desk.resend(letter.id, ANNA)
    assert await state(site) == before


async def test_release_by_agent_is_no_consent(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    letter = await site.letter_row()
    before = await state(site)
    bad = [
        ("nope", ANNA, "asked by phone", UnknownTarget),
        (letter.id, ANNA, "", InvalidRequest),
        (letter.id, ANNA, "   ", InvalidRequest),
        (letter.id, ANNA, "x" * 501, InvalidRequest),
        (letter.id, "", "asked by phone", InvalidRequest),
    ]
    for letter_id, actor, reason, error in bad:
        with pytest.raises(error):
            await desk.release_by_agent(letter_id, actor, reason)
    assert await state(site) == before
    with pytest.raises(WrongState):
        await desk.released_original(letter.id, "anna@broker.example")

    count = len(site.sink.messages)
    delivery = await desk.release_by_agent(letter.id, ANNA, "asked by phone")
    await site.sink.expect(count + 1)
    [released] = [m for m in site.sink.messages[count:] if m.rcpt_tos == [PROSPECT]]
    fields = headers.fields_of(released.data)
    [stamp] = headers.values(fields, RELEASED_BY_AGENT_HEADER)
    assert f"letter={letter.id}" in stamp and "consent=none" in stamp
    assert headers.values(fields, CONSENT_HEADER) == []
    # signed and oversigned: the header can be neither removed nor added to a signed copy
    [signature] = headers.values(fields, "dkim-signature")
    names = "".join(signature.split()).lower()
    assert names.count("x-sealrelay-released-by-agent") == 2

    assert (await site.letter_row()).status == LetterStatus.RELEASED
    assert await site.count(Consent) == 0
    assert await site.events("consent.given") == []
    assert await site.events("letter.released") == []
    [event] = await site.events("letter.released_by_agent")
    assert event.data == {
        "letter_id": letter.id,
        "recipient": PROSPECT,
        "actor": ANNA,
        "reason": "asked by phone",
    }
    assert event.delivery_id == delivery.id

    original = (await desk.released_original(letter.id, "anna@broker.example")).data
    assert RELEASED_BY_AGENT_HEADER.encode() in original
    with pytest.raises(WrongState, match="no consent"):
        await desk.consent_pdf(letter.id, ANNA)
    before = await state(site)
    with pytest.raises(WrongState):
        await desk.release_by_agent(letter.id, ANNA, "again")
    with pytest.raises(WrongState):
        await desk.resend(letter.id, ANNA)
    assert await state(site) == before
    # the prospect's page says the agent sent it; it offers no form and no declarations PDF
    response, body = await site.get(f"/l/{token}")
    page = body.decode()
    assert response.status == 200 and "Das Exposé wurde Ihnen zugesandt" in page
    assert "consent.pdf" not in page and 'name="csrf"' not in page
    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200 and "consent.pdf" not in body.decode()
    response, _ = await site.get(f"/l/{token}/consent.pdf")
    assert response.status == 303
    response, _ = await site.post(f"/l/{token}", {"csrf": "0" * 64, **dict.fromkeys(REQUIRED, "y")})
    assert response.status == 403
    assert await site.count(Consent) == 0


async def test_preview_records_nothing_and_cannot_consent(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    letter = await site.letter_row()
    before = await state(site)
    shown = await desk.preview(letter.id, ANNA)
    assert shown.closed is None
    assert shown.found.letter.id == letter.id and not shown.found.released
    assert [b.id for b in shown.found.blocks if b.checkbox] == list(REQUIRED)
    assert shown.found.letter.button == letter.button
    assert await state(site) == before
    assert await site.events("letter.viewed") == []
    with pytest.raises(UnknownTarget):
        await desk.preview("nope", ANNA)
    for read in (desk.preview, desk.consent_pdf, desk.released_original):
        with pytest.raises(InvalidRequest):
            await read(letter.id, " ")

    await site.relay.links.revoke(letter.message_id, PROSPECT, ANNA)
    assert (await desk.preview(letter.id, ANNA)).closed is Closed.REVOKED
    response, body = await site.get(f"/l/{token}")
    assert response.status == 410 and "Zugang beendet" in body.decode()


async def test_evidence_for_a_lawyer(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(big=False))
    desk = site.relay.letters
    letter = await site.letter_row()
    for read in (desk.consent_pdf, desk.released_original):
        with pytest.raises(UnknownTarget):
            await read("nope", ANNA)
        with pytest.raises(WrongState):
            await read(letter.id, ANNA)
    assert (await site.consent(token)).status == 303
    await queue_idle(site.relay.db)
    size = await journal_size(site)
    pdf = await desk.consent_pdf(letter.id, ANNA)
    assert pdf.startswith(b"%PDF")
    original = (await desk.released_original(letter.id, "anna@broker.example")).data
    async with site.relay.db.transaction() as session:
        consent = await session.scalar(select(Consent))
    assert consent is not None
    assert parse_evidence(original).consent_id == consent.id
    assert await journal_size(site) == size


async def test_a_scanner_only_views_and_never_consents(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(big=False))
    scanner = {"User-Agent": SAFE_LINKS}
    for method in ("HEAD", "GET"):
        response, _ = await site.request(method, f"/l/{token}", headers=scanner)
        assert response.status == 200
    # a POST without the form's CSRF token (what a scanner could send) does nothing
    response, _ = await site.post(f"/l/{token}", dict.fromkeys(REQUIRED, "yes"), headers=scanner)
    assert response.status == 403
    views = await site.events("letter.viewed")
    assert len(views) == 2 and all(v.data["automated"] is True for v in views)
    assert "HEAD request" in views[0].data["automated_reasons"]
    assert any("scanner user agent" in r for r in views[1].data["automated_reasons"])
    types = {e.type for e in await site.events()}
    assert not types & {"consent.given", "letter.released", "letter.released_by_agent"}
    async with site.relay.db.transaction() as session:
        assert (await session.scalar(select(Letter.status))) == LetterStatus.HELD


async def test_an_expired_letter_extended_waits_for_consent_again(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    clock.advance(days=15)
    assert await site.relay.letters.expire_due(clock()) == 1
    assert (await site.letter_row()).status == LetterStatus.EXPIRED
    response, _ = await site.get(f"/l/{token}")
    assert response.status == 410

    until = clock() + timedelta(days=7)
    await site.relay.links.extend((letter.message_id, PROSPECT), until, ANNA)
    assert (await site.letter_row()).status == LetterStatus.HELD
    [extended] = await site.events("link.extended")
    assert extended.data["kind"] == "letter" and extended.data["actor"] == ANNA
    assert (await site.consent(token)).status == 303
    assert (await site.letter_row()).status == LetterStatus.RELEASED


async def test_a_lost_held_original_refuses_and_writes_nothing(site: LetterSite) -> None:
    await site.send_offer(offer(big=False))
    letter = await site.letter_row()
    await site.relay.blobs.delete(letter.held_blob)
    before = await state(site)
    with pytest.raises(WrongState, match="no longer stored"):
        await site.relay.letters.release_by_agent(letter.id, ANNA, "by phone")
    with pytest.raises(WrongState, match="no longer stored"):
        await site.relay.letters.resend(letter.id, ANNA)
    assert await state(site) == before
    assert (await site.letter_row()).letter_blob == letter.letter_blob
