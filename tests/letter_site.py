"""A running relay (SMTP, worker and web) with a clock the test moves on, for letter tests.

Letters are made the real way: the agent sends "[Exposé] Villa am See" through the relay,
the recording upstream gets the letter, and the /l/ link is taken from its text. The
fixtures that start it are in tests/letter_fixtures.py.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from sqlalchemy import func, select

from gateway import users
from gateway.mail import dkim
from gateway.mail.outgoing import Signer
from gateway.store.db import Database
from gateway.store.models import Event, Letter
from sealrelay.serve import Relay
from tests.conftest import AGENT, PASSWORD, Harness, relay_settings
from tests.support import PERSON_UA, Received, Sink, free_port
from web.pages import FORM_SECURITY_HEADERS

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
        async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
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
            query = select(Event).order_by(Event.id)
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
        web={"listen": f"127.0.0.1:{port}", **sections.pop("web", {})},
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


def plain_body(raw: bytes) -> str:
    """The text/plain body of a mail as a reader sees it (links are read from it)."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def token_in(raw: bytes, public_url: str) -> str:
    [token] = set(re.findall(rf"{re.escape(public_url)}/l/([A-Za-z0-9_-]{{43}})", plain_body(raw)))
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
