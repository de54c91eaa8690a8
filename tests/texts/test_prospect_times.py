"""Every page, mail and PDF shows the same instant with its zone (issue 14, item 7).

A real relay on SQLite and PostgreSQL: the agent sends an offer, the prospect consents over
HTTP; the letter page, the offer page, the "already opened" page, the download page, the
consent PDF (read with pypdf), the released copy's link block and the agent's confirmation
(both from the recording upstream) all write each moment in `[branding] timezone` and name
the zone. English once showed UTC without a zone, while the PDF showed Berlin time.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from datetime import datetime
from zoneinfo import ZoneInfo

import pypdf
import pytest
from sqlalchemy import select

from gateway.config import Settings
from gateway.store.models import Consent, Link, LinkKind, Message
from tests.conftest import AGENT, StartRelay, make_message
from tests.letter_fixtures import StartSite
from tests.letter_site import PROSPECT, Clock, offer, text_of
from tests.support import Sink

GERMAN_ZONES = {"CET": "MEZ", "CEST": "MESZ"}


def zone_label(local: datetime, language: str) -> str:
    abbreviation = local.tzname() or ""
    return GERMAN_ZONES.get(abbreviation, abbreviation) if language == "de" else abbreviation


def shown(moment: datetime, zone: str, language: str, *, seconds: bool = False) -> re.Pattern[str]:
    """The local time of `moment` right before its zone's name ("11:00 CET", "11:00 Uhr MEZ")."""
    local = moment.astimezone(ZoneInfo(zone))
    clock = f"{local:%H:%M:%S}" if seconds else f"{local:%H:%M}"
    return re.compile(rf"\b{clock}(?: Uhr| h)? {re.escape(zone_label(local, language))}\b")


def plain_body(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def pdf_text(pdf: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return " ".join(" ".join(page.extract_text().split()) for page in reader.pages)


def test_the_zone_defaults_to_berlin_and_must_exist() -> None:
    assert Settings().branding.timezone == "Europe/Berlin"
    with pytest.raises(ValueError, match="Mars/Olympus"):
        Settings.model_validate({"branding": {"timezone": "Mars/Olympus"}})


@pytest.mark.parametrize(
    ("language", "zone"), [("en", None), ("de", "Asia/Tokyo"), ("es", "America/New_York")]
)
async def test_every_page_mail_and_pdf_shows_the_instant_with_its_zone(
    site_factory: StartSite,
    language: str,
    zone: str | None,
    sink: Sink,
) -> None:
    branding = {"timezone": zone} if zone else {}
    zone = zone or "Europe/Berlin"
    site = await site_factory(
        branding=branding,
    )
    token, _ = await site.send_offer(offer(language=language))
    letter = await site.letter_row()
    async with site.relay.db.transaction() as session:
        letter_link = await session.get(Link, letter.link_id)
    assert letter_link is not None

    _, body = await site.get(f"/l/{token}")
    assert shown(letter_link.expires_at, zone, language).search(text_of(body)), text_of(body)

    assert (await site.consent(token)).status == 303
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
        [download_link] = (
            await session.scalars(select(Link).where(Link.kind == LinkKind.DOWNLOAD))
        ).all()
    given = shown(consent.given_at, zone, language)

    _, body = await site.get(f"/l/{token}/offer")
    assert given.search(text_of(body)), text_of(body)
    _, body = await site.get(f"/l/{token}")
    assert given.search(text_of(body)), text_of(body)

    _, pdf = await site.get(f"/l/{token}/consent.pdf")
    text = pdf_text(pdf)
    assert shown(consent.given_at, zone, language, seconds=True).search(text), text
    assert f"{consent.given_at:%Y-%m-%d %H:%M:%S} UTC" in text, "and the same in UTC"
    assert "Europe/Berlin" not in text or zone == "Europe/Berlin"

    arrived = await site.sink.expect(3)
    [confirmation] = [m for m in arrived if m.rcpt_tos == [AGENT]]
    text = plain_body(confirmation.data)
    # the agent reads German; the instant and its zone are the same
    assert shown(consent.given_at, zone, "de", seconds=True).search(text), text

    [released] = [m for m in arrived[1:] if m.rcpt_tos == [PROSPECT]]
    text = plain_body(released.data)
    expires = shown(download_link.expires_at, zone, language)
    assert expires.search(text), text
    [download_url] = re.findall(rf"{re.escape(site.url)}(/d/[A-Za-z0-9_-]+)", text)
    _, body = await site.get(download_url)
    assert expires.search(text_of(body)), text_of(body)


async def test_the_bounce_tells_the_agent_the_time_in_the_brokerage_zone(
    relay_factory: StartRelay,
) -> None:
    harness = await relay_factory(branding={"timezone": "Asia/Tokyo"})
    harness.sink.refuse["gone@example.org"] = "550 5.1.1 no such user"
    await harness.send(make_message(to="gone@example.org"))
    [report] = await harness.sink.expect(1)
    assert report.mail_from == "<>"
    async with harness.relay.db.transaction() as session:
        message = (await session.scalars(select(Message).order_by(Message.received_at))).first()
    assert message is not None
    parsed = email.message_from_bytes(report.data, policy=email.policy.default)
    explanation = next(p for p in parsed.walk() if p.get_content_type() == "text/plain")
    text = str(explanation.get_content())
    # the agent's language is German; the instant is the same, in Tokyo, named
    assert shown(message.received_at, "Asia/Tokyo", "de").search(text), text
    assert "(UTC)" not in text


async def test_an_expired_letter_and_the_agents_renewal_mail_name_the_zone(
    site_factory: StartSite,
    sink: Sink,
    clock: Clock,
) -> None:
    site = await site_factory(
        branding={"timezone": "America/Sao_Paulo"},  # no letters for its zone: UTC-3
    )
    token, _ = await site.send_offer(offer(language="en"))
    csrf = await site.csrf(token)
    letter = await site.letter_row()
    async with site.relay.db.transaction() as session:
        link = await session.get(Link, letter.link_id)
    assert link is not None
    clock.advance(days=14, seconds=1)
    response, body = await site.get(f"/l/{token}")
    assert response.status == 410
    local = link.expires_at.astimezone(ZoneInfo("America/Sao_Paulo"))
    assert f"{local:%H:%M} UTC-3" in text_of(body), text_of(body)

    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 200
    arrived = await site.sink.expect(2)
    [request] = [m for m in arrived if m.rcpt_tos == [AGENT]]
    text = plain_body(request.data)
    # the agent reads the brokerage's language (German), the same instant and zone
    assert f"{local:%H:%M} Uhr UTC-3" in text, text
