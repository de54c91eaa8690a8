"""The prospect's registered-letter pages over real HTTP, on SQLite and PostgreSQL.

Letters are made the real way: the agent sends "[Exposé] Villa am See" through a running
relay (SMTP, worker and web, with a clock the test can move on), the recording upstream gets
the letter, and the /l/ link is taken from its text.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import os
import re
import stat
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yarl
from sqlalchemy import func, select

from gateway import users
from gateway.letters.renewal import request_mail
from gateway.mail import dkim, headers
from gateway.mail.outgoing import Signer
from gateway.mail.own_mail import render
from gateway.store import journal
from gateway.store.db import Database
from gateway.store.models import Consent, Delivery, Event, Letter, LetterStatus, Message
from gateway.texts.catalog import load_catalogs
from sealrelay.serve import Relay
from tests.conftest import AGENT, PASSWORD, Harness, relay_settings
from tests.queue_wait import queue_idle
from tests.support import Received, Sink, free_port
from web.csrf import FormTokens, load_or_create_key, origin_of
from web.pages import FORM_SECURITY_HEADERS

if TYPE_CHECKING:  # letter_fixtures builds on this module
    from tests.letter_fixtures import StartSite

PROSPECT = "paula@example.com"
SUBJECT = "[Exposé] Villa am See"
BUTTON_DE = "Provisionspflichtig beauftragen und Exposé öffnen"
BUTTON_ES = "Encargar con obligación de pago de comisión y abrir el exposé"
REQUIRED = ("withdrawal", "early-start", "terms")
FLOOR_PLAN = os.urandom(60_000)
BIG_PDF = os.urandom(3 * 1024 * 1024)


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A small valid one-colour PNG (the agent's signature logo)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


LOGO_PNG = png(160, 40, (138, 21, 56))


@dataclass
class Clock:
    """Real time plus an offset the test moves on, so the worker keeps running normally."""

    offset: timedelta = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


@dataclass
class LetterSite:
    harness: Harness
    clock: Clock

    @property
    def relay(self) -> Relay:
        return self.harness.relay

    @property
    def sink(self) -> Sink:
        return self.harness.sink

    @property
    def url(self) -> str:
        return self.harness.settings.server.public_url

    async def send_offer(
        self, raw: bytes | None = None, *, recipient: str = PROSPECT
    ) -> tuple[str, Received]:
        """Send an offer to `recipient`; the letter's token and the letter as received."""
        before = len(self.sink.messages)
        await self.harness.send(raw or offer(), recipients=[recipient])
        await self.sink.expect(before + 1)
        [letter] = [m for m in self.sink.messages[before:] if m.rcpt_tos == [recipient]]
        return token_in(letter.data, self.url), letter

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        async with aiohttp.ClientSession() as http:
            url = yarl.URL(self.url + path, encoded=True)  # sent as written, dots and all
            async with http.request(method, url, allow_redirects=False, **kwargs) as response:
                return response, await response.read()

    async def get(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        return await self.request("GET", path, **kwargs)

    async def post(
        self, path: str, fields: dict[str, str], **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        return await self.request("POST", path, data=fields, **kwargs)

    async def csrf(self, token: str, path: str = "") -> str:
        _, body = await self.get(f"/l/{token}{path}")
        match = re.search(r'name="csrf" value="([0-9a-f]{64})"', body.decode())
        assert match is not None, body.decode()[:500]
        return match.group(1)

    async def consent(
        self, token: str, boxes: tuple[str, ...] = REQUIRED
    ) -> aiohttp.ClientResponse:
        csrf = await self.csrf(token)
        response, _ = await self.post(f"/l/{token}", {"csrf": csrf, **dict.fromkeys(boxes, "yes")})
        return response

    async def events(self, *types: str) -> list[Event]:
        async with self.relay.db.transaction() as session:
            query = select(Event).order_by(Event.seq)
            if types:
                query = query.where(Event.type.in_(types))
            return list((await session.scalars(query)).all())

    async def count(self, model: Any, *where: Any) -> int:
        async with self.relay.db.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(model).where(*where)))

    async def letter_row(self) -> Letter:
        async with self.relay.db.transaction() as session:
            [letter] = (await session.scalars(select(Letter))).all()
            return letter


@asynccontextmanager
async def running_site(
    database: Database,
    sink: Sink,
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    dkim_key: dkim.DkimKey,
    dkim_key_file: Path,
    clock: Clock,
    **sections: dict[str, Any],
) -> AsyncIterator[LetterSite]:
    """A full relay whose public URL is its own web listener (as a browser must see it)."""
    await users.add_user(database, AGENT, PASSWORD)
    cert, key = tls_files
    port = free_port()
    settings = relay_settings(
        tmp_path,
        sink.port,
        server={"public_url": f"http://127.0.0.1:{port}", **sections.pop("server", {})},
        web={"listen": f"127.0.0.1:{port}"},
        smtp={
            "tls_cert": str(cert),
            "tls_key": str(key),
            "max_message_size": 20 * 1024 * 1024,
        },
        dkim={"broker.example": {"selector": "s2026", "key_file": str(dkim_key_file)}},
        branding={
            "company_name": "Müller & Söhne Immobilien",
            "primary_color": "#8a1538",
            **sections.pop("branding", {}),
        },
        letter={
            "company_address": "Seestraße 1, 82319 Starnberg",
            "company_email": "info@broker.example",
            "commission": "3,57 % des Kaufpreises inkl. USt.",
            **sections.pop("letter", {}),
        },
        **sections,
    )
    signer = Signer({"broker.example": dkim_key})  # the session's key, not loaded per relay
    relay = Relay(settings, db=database, signer=signer, clock=clock)
    await relay.start()
    try:
        yield LetterSite(Harness(relay, sink, settings, dkim_key), clock)
    finally:
        await relay.stop()


def offer(
    subject: str = SUBJECT,
    html: str | None = None,
    language: str | None = None,
    big: bool = True,
) -> bytes:
    """An offer with a text and an HTML body, an inline logo, a floor plan and a large PDF."""
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>"
    message["Subject"] = subject
    message["Message-ID"] = "<villa@broker.example>"
    if language:
        message["X-Sealrelay-Language"] = language
    message.set_content("Guten Tag,\n\nhier ist das Exposé zur Villa am See.\n\nAnna Agent\n")
    message.add_alternative(
        html
        or (
            "<html><head><title>Exposé</title></head><body>"
            "<p>Guten Tag,</p><p>hier ist das <b>Exposé</b> zur Villa am See.</p>"
            '<p><img src="cid:logo@broker.example" alt="Logo"></p></body></html>'
        ),
        subtype="html",
    )
    html_part = message.get_body(("html",))
    assert html_part is not None
    html_part.make_related()
    html_part.add_related(
        LOGO_PNG,
        maintype="image",
        subtype="png",
        cid="<logo@broker.example>",
        filename="logo.png",
        disposition="inline",
    )
    message.add_attachment(
        FLOOR_PLAN, maintype="application", subtype="pdf", filename="Grundriss Erdgeschoss.pdf"
    )
    if big:
        message.add_attachment(
            BIG_PDF, maintype="application", subtype="pdf", filename="Exposé Villa am See.pdf"
        )
    return message.as_bytes(policy=email.policy.SMTP)


def token_in(raw: bytes, public_url: str) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    [token] = set(
        re.findall(rf"{re.escape(public_url)}/l/([A-Za-z0-9_-]{{43}})", body.get_content())
    )
    return token


def text_of(body: bytes) -> str:
    """The page's visible text, roughly: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", body.decode()).split())


def assert_security_headers(response: aiohttp.ClientResponse) -> None:
    for name, value in FORM_SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.url)
    assert "form-action 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers.get("Cache-Control") == "no-store", response.url


# --- the letter page ------------------------------------------------------------------------


async def test_get_shows_the_letter_and_records_only_a_view(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    response, body = await site.get(f"/l/{token}", headers={"User-Agent": "Phone/1.0"})
    assert response.status == 200
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert '<html lang="de">' in html
    assert "<script" not in html, "the page needs no JavaScript"
    assert "Villa am See" in text and "[Exposé]" not in text
    assert f"Anna Agent ({AGENT})" in text
    assert "Müller &amp; Söhne Immobilien" in html
    for title in (
        "Widerrufsbelehrung",
        "Beginn vor Ablauf der Widerrufsfrist",
        "Maklerbedingungen und Provision",
        "Datenschutzhinweise",
    ):
        assert title in text
    assert "Muster-Widerrufsformular" in text  # the full text, not a summary
    assert "Seestraße 1, 82319 Starnberg" in text  # placeholders filled
    for block in REQUIRED:
        assert f'name="{block}"' in html and f'for="check-{block}"' in html
    assert 'name="privacy"' not in html, "an informational block has nothing to tick"
    assert "Ich verlange ausdrücklich" in text
    assert html.count("erforderlich</span>") == 3
    # § 312j (3) BGB: the button says exactly what the block set says, nothing else
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_DE
    assert " required" not in html, "the server judges, not the browser"
    assert re.search(r'name="csrf" value="[0-9a-f]{64}"', html)

    response, _ = await site.request("HEAD", f"/l/{token}")
    assert response.status == 200

    [view] = await site.events("letter.viewed")
    letter = await site.letter_row()
    assert view.message_id == letter.message_id
    assert view.data == {
        "letter_id": letter.id,
        "recipient": PROSPECT,
        "ip": "127.0.0.1",
        "user_agent": "Phone/1.0",
    }
    types = [event.type for event in await site.events()]
    assert "consent.given" not in types and "letter.released" not in types
    assert letter.status == LetterStatus.HELD
    assert await site.count(Consent) == 0
    await queue_idle(site.relay.db)  # a wrongly queued copy would have arrived by now
    assert [m.rcpt_tos for m in site.sink.messages] == [[PROSPECT]]


async def test_the_page_speaks_the_letters_language(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(language="es"))
    response, body = await site.get(f"/l/{token}", headers={"Accept-Language": "de"})
    html = body.decode()
    assert response.status == 200 and '<html lang="es">' in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_ES
    assert "Sus declaraciones" in html and "Parte 1 de 4" in html


async def test_post_without_csrf_or_from_elsewhere_is_403(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    boxes = dict.fromkeys(REQUIRED, "yes")
    before = len(await site.events())
    attempts = [
        ({**boxes}, {}),
        ({"csrf": "0" * 64, **boxes}, {}),
        ({"csrf": csrf[:-1], **boxes}, {}),
        ({"csrf": csrf, **boxes}, {"Origin": "https://evil.example"}),
        ({"csrf": csrf, **boxes}, {"Origin": "null"}),
        ({"csrf": csrf, **boxes}, {"Origin": site.url.replace("127.0.0.1", "localhost")}),
    ]
    for fields, extra in attempts:
        response, body = await site.post(f"/l/{token}", fields, headers=extra)
        assert response.status == 403, (fields, extra)
        assert "Anfrage nicht bestätigt" in body.decode()
        assert_security_headers(response)
    assert len(await site.events()) == before
    assert await site.count(Consent) == 0
    assert (await site.letter_row()).status == LetterStatus.HELD

    # a form of another letter does not fit this one
    other, _ = await site.send_offer(recipient="omar@example.org")
    response, _ = await site.post(f"/l/{token}", {"csrf": await site.csrf(other), **boxes})
    assert response.status == 403

    # the right origin (as browsers send it) is accepted
    response, _ = await site.post(
        f"/l/{token}", {"csrf": csrf, **boxes}, headers={"Origin": site.url}
    )
    assert response.status == 303


async def test_missing_boxes_show_the_page_again_and_write_nothing(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    before = len(await site.events())
    response, body = await site.post(f"/l/{token}", {"csrf": csrf, "withdrawal": "yes"})
    assert response.status == 422
    html, text = body.decode(), text_of(body)
    assert "Es fehlen noch Erklärungen" in text
    summary = html[
        html.index('role="alert"') : html.index("</section>", html.index('role="alert"'))
    ]
    assert "Beginn vor Ablauf der Widerrufsfrist" in summary
    assert "Maklerbedingungen und Provision" in summary
    assert "Widerrufsbelehrung" not in summary
    assert re.search(r'name="withdrawal" value="yes" checked', html)
    assert re.search(r'name="terms" value="yes" aria-invalid="true"', html)
    assert re.search(r'name="early-start" value="yes" aria-invalid="true"', html)
    assert text.count("Bitte kreuzen Sie diese Erklärung an.") == 2
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_DE

    response, _ = await site.post(f"/l/{token}", {"csrf": csrf})
    assert response.status == 422
    assert len(await site.events()) == before
    assert await site.count(Consent) == 0


async def test_consent_releases_and_the_offer_shows_body_and_attachments(
    site: LetterSite,
) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    response = await site.consent(token)
    assert response.status == 303
    assert response.headers["Location"] == f"/l/{token}/offer"

    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert "Villa am See" in text and f"Anna Agent ({AGENT})" in text
    assert "hier ist das Exposé zur Villa am See" in text
    assert "<b>Exposé</b>" in html, "the HTML body is shown as HTML"
    assert "<title>" not in html.split("</head>", 1)[1]
    assert "Grundriss Erdgeschoss.pdf" in text
    # the large PDF was linked in the held copy: the body carries its download link
    assert f"{site.url}/d/" in html
    assert "Exposé Villa am See.pdf" in text
    # the inline logo is served from here; nothing loads from elsewhere
    [logo] = re.findall(rf'<img src="(/l/{token}/a/[0-9.]+)" alt="Logo">', html)
    response, data = await site.get(logo)
    assert response.status == 200 and data == LOGO_PNG
    assert response.headers["Content-Type"] == "image/png"

    [attachment] = re.findall(rf'href="(/l/{token}/a/[0-9.]+)"', html)
    response, data = await site.get(attachment)
    assert response.status == 200 and data == FLOOR_PLAN
    assert_security_headers(response)
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="Grundriss Erdgeschoss.pdf";'
        " filename*=UTF-8''Grundriss%20Erdgeschoss.pdf"
    )
    response, data = await site.request("HEAD", attachment)
    assert response.status == 200 and data == b""
    assert response.headers["Content-Length"] == str(len(FLOOR_PLAN))
    response, _ = await site.get(f"/l/{token}/a/99")
    assert response.status == 404

    response, pdf = await site.get(f"/l/{token}/consent.pdf")
    assert response.status == 200 and pdf.startswith(b"%PDF")
    assert response.headers["Content-Type"] == "application/pdf"
    assert "Erkl%C3%A4rungen%20Villa%20am%20See.pdf" in response.headers["Content-Disposition"]
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    assert hashlib.sha256(pdf).hexdigest() == consent.pdf_blob
    assert sorted(consent.checked) == sorted(REQUIRED)
    assert consent.ip == "127.0.0.1"

    # the prospect gets the original, the agent the confirmation
    arrived = await site.sink.expect(3)
    assert sorted(m.rcpt_tos[0] for m in arrived) == sorted([PROSPECT, PROSPECT, AGENT])

    # a second POST changes nothing and leads to the offer again
    response, _ = await site.post(f"/l/{token}", {"csrf": csrf, "terms": "yes"})
    assert response.status == 303 and response.headers["Location"] == f"/l/{token}/offer"
    assert await site.count(Consent) == 1
    types = [event.type for event in await site.events()]
    assert types.count("consent.given") == 1 and types.count("letter.released") == 1

    # the letter link now shows a short page, and still records the view
    views = len(await site.events("letter.viewed"))
    response, body = await site.get(f"/l/{token}")
    assert response.status == 200
    html = body.decode()
    assert "Sie haben das Exposé bereits geöffnet" in html
    assert f'href="/l/{token}/offer"' in html and f'href="/l/{token}/consent.pdf"' in html
    assert "<button" not in html
    assert len(await site.events("letter.viewed")) == views + 1
    async with site.relay.db.transaction() as session:
        assert (await journal.verify(session)).ok


async def test_concurrent_posts_release_exactly_once(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    fields = {"csrf": csrf, **dict.fromkeys(REQUIRED, "yes")}
    answers = await asyncio.gather(*(site.post(f"/l/{token}", fields) for _ in range(5)))
    assert [response.status for response, _ in answers] == [303] * 5
    letter = await site.letter_row()
    assert letter.status == LetterStatus.RELEASED
    assert await site.count(Consent) == 1
    # one released copy to the prospect (besides the letter), one confirmation to the agent
    assert (
        await site.count(
            Delivery, Delivery.message_id == letter.message_id, Delivery.blob != letter.letter_blob
        )
        == 1
    )
    assert await site.count(Delivery, Delivery.recipient == AGENT) == 1
    assert len(await site.events("consent.given")) == 1
    assert len(await site.events("letter.released")) == 1
    arrived = await site.sink.expect(3)
    await queue_idle(site.relay.db)
    assert len(site.sink.messages) == len(arrived) == 3


async def test_offer_and_files_wait_for_the_consent(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    for path in ("/offer", "/consent.pdf", "/a/2"):
        response, _ = await site.get(f"/l/{token}{path}")
        assert response.status == 303, path
        assert response.headers["Location"] == f"/l/{token}"
    assert await site.events("letter.viewed") == []


async def test_unknown_tokens_get_the_friendly_404(site: LetterSite) -> None:
    fake = "A" * 43
    for method, path in [
        ("GET", f"/l/{fake}"),
        ("GET", f"/l/{fake}/offer"),
        ("GET", f"/l/{fake}/consent.pdf"),
        ("GET", f"/l/{fake}/a/1"),
        ("POST", f"/l/{fake}"),
        ("POST", f"/l/{fake}/renew"),
        ("GET", "/l/"),
        ("GET", "/l/../etc/passwd"),
    ]:
        response, body = await site.request(method, path, headers={"Accept-Language": "en"})
        assert response.status == 404, (method, path)
        assert "Link not found" in body.decode()
        assert_security_headers(response)
    assert await site.events("letter.viewed") == []


async def test_released_offer_stays_available_after_the_link_expired(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    clock.advance(days=30)
    for path in ("/offer", "/consent.pdf"):
        response, _ = await site.get(f"/l/{token}{path}")
        assert response.status == 200, path


# --- expired letters and the request for a new link -----------------------------------------


async def test_expired_letter_offers_to_ask_the_agent_once_a_day(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    clock.advance(days=14, seconds=1)

    response, body = await site.get(f"/l/{token}")
    assert response.status == 410
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert '<html lang="de">' in html
    assert "Dieser Link ist abgelaufen" in text and "Villa am See" in text
    assert f'action="/l/{token}/renew"' in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == "Anna Agent um einen neuen Link bitten"
    assert len(await site.events("letter.viewed")) == 1, "an expired letter records no view"

    # consenting is over: 410, nothing written
    response, _ = await site.post(f"/l/{token}", {"csrf": csrf, **dict.fromkeys(REQUIRED, "y")})
    assert response.status == 410
    assert await site.count(Consent) == 0

    response, _ = await site.post(f"/l/{token}/renew", {})
    assert response.status == 403
    response, _ = await site.post(
        f"/l/{token}/renew", {"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert response.status == 403
    assert await site.events("letter.renewal_requested") == []

    for _ in range(2):
        response, body = await site.post(f"/l/{token}/renew", {"csrf": csrf})
        assert response.status == 200
        assert "Wir haben Anna Agent gebeten" in text_of(body)
    requests = await site.sink.expect(2)
    await queue_idle(site.relay.db)
    to_agent = [m for m in site.sink.messages if m.rcpt_tos == [AGENT]]
    assert len(requests) == 2 and len(to_agent) == 1
    mail = to_agent[0]
    assert mail.mail_from in ("", "<>")  # the null sender
    fields = headers.fields_of(mail.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        f"Neuer Link erbeten: Villa am See – {PROSPECT}"
    )
    assert headers.first_value(fields, "auto-submitted") == "auto-generated"
    assert headers.addresses(fields, "from") == ["postmaster@broker.example"]  # signed
    assert headers.addresses(fields, "reply-to") == [PROSPECT]
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert not parsed.defects
    body_text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert PROSPECT in body_text and "„Villa am See“" in body_text

    [event] = await site.events("letter.renewal_requested")
    letter = await site.letter_row()
    assert event.data["letter_id"] == letter.id and event.data["ip"] == "127.0.0.1"
    assert event.message_id == letter.message_id
    async with site.relay.db.transaction() as session:
        [request_message] = (
            await session.scalars(
                select(Message).where(Message.id == event.data["request_message_id"])
            )
        ).all()
    assert request_message.kind == "confirmation" and request_message.sender == ""

    # a day later the prospect may ask again
    clock.advance(hours=24, seconds=1)
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 200
    await site.sink.expect(3)
    assert len(await site.events("letter.renewal_requested")) == 2


async def test_renew_of_a_valid_letter_leads_back_to_it(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 303 and response.headers["Location"] == f"/l/{token}"
    assert await site.events("letter.renewal_requested") == []


async def test_concurrent_renewals_send_one_mail(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    clock.advance(days=15)
    answers = await asyncio.gather(
        *(site.post(f"/l/{token}/renew", {"csrf": csrf}) for _ in range(4))
    )
    assert [response.status for response, _ in answers] == [200] * 4
    assert len(await site.events("letter.renewal_requested")) == 1
    assert await site.count(Delivery, Delivery.recipient == AGENT) == 1


def test_renewal_mail_keeps_every_value_on_one_line() -> None:
    catalog = load_catalogs()["de"]
    now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    mail = request_mail(
        catalog,
        hostname="relay.broker.example",
        agent=AGENT,
        recipient=PROSPECT,
        subject="Villa\r\nBcc: victim@example.com\u2028am See " + "ä" * 200,
        expired_on=now,
    )
    raw = render(mail, sender="postmaster@broker.example", hostname="relay.broker.example", now=now)
    fields = headers.fields_of(raw)
    assert headers.values(fields, "bcc") == []
    subject = headers.decoded(headers.first_value(fields, "subject") or "")
    assert subject.startswith("Neuer Link erbeten: Villa Bcc: victim@example.com am See ä")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    assert "23.11.2026" in parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]


# --- escaping and sanitizing ----------------------------------------------------------------


def hostile_block_set(directory: Path) -> Path:
    for language in ("de", "en", "es"):
        folder = directory / language
        folder.mkdir(parents=True)
        (folder / "text.md").write_text(
            "Text mit <script>alert(1)</script> und <b onclick=x()>HTML</b>\n\n"
            "[Link](javascript:alert(2))\n",
            encoding="utf-8",
        )
        (folder / "blocks.toml").write_text(
            'button = "Kostenpflichtig <i>bestellen</i>"\n'
            'letter_subject = "Exposé: {subject}"\n'
            'intro = "Hallo"\nlink_label = "Öffnen"\noutro = "Gruß"\n'
            "[[block]]\n"
            'id = "terms"\n'
            'title = "Bedingungen <img src=x onerror=alert(3)>"\n'
            'file = "text.md"\n'
            'checkbox = "Ich <u>stimme</u> zu"\n',
            encoding="utf-8",
        )
    return directory


async def test_html_in_subject_and_blocks_is_escaped_and_scripts_removed(
    site_factory: StartSite,
    tmp_path: Path,
) -> None:
    blocks = hostile_block_set(tmp_path / "hostile")
    site = await site_factory(
        letter={"block_sets": {"hostile": str(blocks)}},
        policy={"letter_block_set": "hostile"},
    )
    body_html = (
        "<html><head><style>p{color:red}</style><script>steal()</script></head>"
        '<body onload="steal()"><p onclick="steal()" style="color:red">Willkommen</p>'
        '<img src="https://tracker.example/pixel.gif" alt="pixel">'
        '<a href="javascript:steal()">klick</a> <a href="https://broker.example/">Web</a>'
        '<iframe src="https://evil.example/"></iframe><form action="https://evil.example/">'
        '<input name="pw"></form><svg onload="steal()"></svg></body></html>'
    )
    raw = offer(
        subject='[Exposé] <b>Villa</b> <script>alert("s")</script>',
        html=body_html,
        big=False,
    )
    token, _ = await site.send_offer(raw)
    response, body = await site.get(f"/l/{token}")
    assert response.status == 200
    html = body.decode()
    assert "<script" not in html
    assert "&lt;b&gt;Villa&lt;/b&gt; &lt;script&gt;alert(&#34;s&#34;)&lt;/script&gt;" in html
    assert "Bedingungen &lt;img src=x onerror=alert(3)&gt;" in html
    assert "Ich &lt;u&gt;stimme&lt;/u&gt; zu" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "onclick" not in html.replace("&lt;b onclick=x()&gt;", "")
    assert 'href="javascript:' not in html and "[Link](javascript:alert(2))" in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == "Kostenpflichtig &lt;i&gt;bestellen&lt;/i&gt;"

    assert (await site.consent(token, ("terms",))).status == 303
    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200
    html = body.decode()
    main = html[html.index("<main") :]
    assert "Willkommen" in main and 'href="https://broker.example/"' in main
    for banned in (
        "<script",
        "steal()",
        "onload",
        "onclick",
        "style=",
        "<style",
        "tracker.example",
        "<iframe",
        '<form action="https',
        "<input",
        "javascript:",
        "<svg onload",
    ):
        assert banned not in main, banned
    assert '<img alt="pixel">' in main, "external images are not loaded"
    assert "&lt;b&gt;Villa&lt;/b&gt;" in html


# --- CSRF pieces ----------------------------------------------------------------------------


def test_secret_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"
    first = FormTokens(path, "https://makler.example/")
    second = FormTokens(path, "https://makler.example")
    token = "t" * 43
    assert first.token_for(token) == second.token_for(token)
    assert first.valid(token, second.token_for(token))
    assert not first.valid(token, None) and not first.valid(token, "")
    assert not first.valid("u" * 43, first.token_for(token))
    (tmp_path / "short.key").write_bytes(b"x" * 8)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_or_create_key(tmp_path / "short.key")


def test_origins_compare_as_browsers_write_them() -> None:
    tokens = FormTokens(Path("/nonexistent"), "https://Makler.Example:443/sealrelay")
    assert tokens.origin == "https://makler.example"
    assert tokens.origin_allowed(None)
    assert tokens.origin_allowed("https://makler.example")
    assert not tokens.origin_allowed("http://makler.example")
    assert not tokens.origin_allowed("https://makler.example.evil.example")
    assert not tokens.origin_allowed("null")
    assert not tokens.origin_allowed("")
    assert origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert origin_of("http://[2001:db8::1]:80") == "http://[2001:db8::1]"


async def test_the_key_lives_beside_the_blob_store(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    await site.csrf(token)
    path = site.harness.settings.storage.path.parent / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
