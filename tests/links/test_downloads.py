"""The prospect's download page over real HTTP, on SQLite and PostgreSQL.

Each test starts a relay with only the web role and a clock it controls, and makes links the
way the gateway does: a Message, StoredFile rows, blobs, and gateway.links.tokens.new_link.
"""

from __future__ import annotations

import asyncio
import email.message
import hashlib
import io
import logging
import os
import re
import zipfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from sqlalchemy import select, update

from gateway.config import BrandingSettings
from gateway.links.tokens import new_link, new_token
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Event, Link, LinkFile, LinkKind, Message, StoredFile
from gateway.texts.catalog import load_catalogs, negotiate
from rules.language import SHIPPED_LANGUAGES
from sealrelay.serve import Relay
from tests.conftest import AGENT, relay_settings
from tests.support import PERSON_UA, chained, free_port
from web.client_ip import ClientIpResolver
from web.downloads import (
    BAD_TOKEN_LIMIT,
    SECURITY_HEADERS,
    BadTokenLimiter,
    Served,
    branding_css,
    content_disposition,
    contrast,
    plan_range,
    safe_filename,
)
from web.pages import agent_of, file_kind

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PROSPECT = "prospect@example.com"
LOGO = "https://cdn.broker.example/logo.png"
MB8 = 8 * 1024 * 1024


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class MadeLink:
    token: str
    link_id: str
    message_id: str
    files: list[StoredFile]
    data: dict[str, bytes] = field(default_factory=dict)  # file id -> bytes

    def path(self, suffix: str = "") -> str:
        return f"/d/{self.token}{suffix}"

    def file_path(self, stored: StoredFile) -> str:
        return f"/d/{self.token}/f/{stored.id}"


@dataclass
class Pages:
    relay: Relay
    clock: Clock

    @property
    def url(self) -> str:
        return f"http://{self.relay.settings.web.listen}"

    async def message(self, subject: str = "Ihr Exposé", sender: str = AGENT) -> str:
        async with self.relay.db.transaction() as session:
            message = Message(
                sender=sender,
                blob="0" * 64,
                size=0,
                message_id_header="<m@broker.example>",
                subject=subject,
                received_at=self.clock(),
            )
            session.add(message)
            await session.flush()
            return message.id

    async def store(
        self, message_id: str, files: Sequence[tuple[str, str, bytes]]
    ) -> tuple[list[StoredFile], dict[str, bytes]]:
        stored, data = [], {}
        for name, content_type, content in files:
            digest = await self.relay.blobs.put(content)
            row = StoredFile(
                message_id=message_id,
                sha256=digest,
                filename=name,
                content_type=content_type,
                size=len(content),
            )
            stored.append(row)
        async with self.relay.db.transaction() as session:
            session.add_all(stored)
        for row, (_, _, content) in zip(stored, files, strict=True):
            data[row.id] = content
        return stored, data

    async def link(
        self,
        files: Sequence[tuple[str, str, bytes]] = (("Exposé.pdf", "application/pdf", b"%PDF"),),
        *,
        language: str = "de",
        subject: str = "Ihr Exposé",
        sender: str = AGENT,
        recipient: str = PROSPECT,
        days: int = 90,
        existing: tuple[str, list[StoredFile], dict[str, bytes]] | None = None,
    ) -> MadeLink:
        """A link to new files, or with `existing` another recipient's link to the same ones."""
        if existing is None:
            message_id = await self.message(subject, sender)
            stored, data = await self.store(message_id, files)
        else:
            message_id, stored, data = existing
        token = new_token()
        link, entries = new_link(
            token=token,
            kind=LinkKind.DOWNLOAD,
            message_id=message_id,
            recipient=recipient,
            language=language,
            now=self.clock(),
            days=days,
            files=stored,
        )
        async with self.relay.db.transaction() as session:
            session.add(link)
            await session.flush()
            session.add_all(entries)
        return MadeLink(token, link.id, message_id, stored, data)

    async def events(self, *types: str) -> list[Event]:
        async with self.relay.db.transaction() as session:
            query = select(Event).order_by(Event.id)
            if types:
                query = query.where(Event.type.in_(types))
            return list((await session.scalars(query)).all())

    async def downloads(self, made: MadeLink, stored: StoredFile) -> int:
        async with self.relay.db.transaction() as session:
            return (
                await session.scalars(
                    select(LinkFile.downloads).where(
                        LinkFile.link_id == made.link_id, LinkFile.file_id == stored.id
                    )
                )
            ).one()

    async def get(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        return await self.request("GET", path, **kwargs)

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """One request; `path` is sent as written (no client-side dot-segment cleanup)."""
        async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
            url = yarl.URL(self.url + path, encoded=True)
            async with http.request(method, url, allow_redirects=False, **kwargs) as response:
                return response, await response.read()


@asynccontextmanager
async def running_pages(
    database: Database,
    tmp_path: Path,
    clock: Clock,
    blobs: BlobStore | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[Pages]:
    sections.setdefault(
        "branding",
        {
            "company_name": "Müller & Söhne Immobilien",
            "logo_url": LOGO,
            "primary_color": "#8a1538",
            "background_color": "#f5f1ea",
        },
    )
    settings = relay_settings(tmp_path, free_port(), **sections)
    relay = Relay(settings, roles={"web"}, db=database, blobs=blobs, clock=clock)
    await relay.start()
    try:
        yield Pages(relay, clock)
    finally:
        await relay.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def pages(database: Database, tmp_path: Path, clock: Clock) -> AsyncIterator[Pages]:
    async with running_pages(database, tmp_path, clock) as running:
        yield running


def assert_security_headers(response: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.url)
    assert response.headers.get("Cache-Control") == "no-store", response.url


def offered_filename(header: str) -> str:
    """The name a browser saves under: `filename*` (RFC 6266 / 5987) wins over `filename`."""
    parsed = email.message.Message()
    parsed["Content-Disposition"] = header
    assert parsed.get_content_disposition() == "attachment"
    params = parsed.get_params(header="content-disposition") or []
    extended = [value for key, value in params if key == "filename" and isinstance(value, tuple)]
    assert extended, header
    return collapse_rfc2231_value(extended[0])


def text_of(body: bytes) -> str:
    """The page's visible text, roughly: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", body.decode()).split())


# --- the page -----------------------------------------------------------------------------------


async def test_page_in_each_language_with_branding(pages: Pages) -> None:
    files = [
        ("Exposé Müllerstraße 12.pdf", "application/pdf", os.urandom(MB8)),
        ("Grundriss EG.png", "image/png", b"\x89PNG" + b"0" * 1500),
    ]
    first = await pages.link(files, language="de", subject="Exposé Müllerstraße 12")
    expected = {
        "de": ("Ihre Dateien", "8,4 MB", "1,5 kB", "Verfügbar bis 21.02.2027", "Herunterladen"),
        "en": ("Your files", "8.4 MB", "1.5 kB", "Available until 21 Feb 2027", "Download"),
        "es": ("Sus archivos", "8,4 MB", "1,5 kB", "Disponible hasta el 21/02/2027", "Descargar"),
    }
    for language, (title, big, small, expires, action) in expected.items():
        made = (
            first
            if language == "de"
            else await pages.link(
                language=language,
                existing=(first.message_id, first.files, first.data),
                recipient=f"{language}@example.com",
            )
        )
        response, body = await pages.get(made.path(), headers={"User-Agent": "Phone/1.0"})
        assert response.status == 200
        assert response.content_type == "text/html"
        html, text = body.decode(), text_of(body)
        assert f'<html lang="{language}">' in html
        for visible in (title, big, small, expires, action, "Exposé Müllerstraße 12.pdf", AGENT):
            assert visible in text, (language, visible)
        assert "Exposé Müllerstraße 12" in text
        assert "Müller &amp; Söhne Immobilien" in html
        assert f'src="{LOGO}"' in html
        assert made.file_path(made.files[0]) in html
        assert made.path("/zip") in html, "more than one file: offer a zip"
        assert "<script" not in html, "the page needs no JavaScript"

    css = re.search(r'href="(/branding\.css\?v=\w+)"', html)
    assert css is not None
    response, body = await pages.get(css.group(1))
    assert response.status == 200 and response.content_type == "text/css"
    assert "--brand: #8a1538;" in body.decode()
    assert "--page: #f5f1ea;" in body.decode()
    stylesheet = re.search(r'href="(/static/downloads\.css\?v=\w+)"', html)
    assert stylesheet is not None
    response, _ = await pages.get(stylesheet.group(1))
    assert response.status == 200 and response.content_type == "text/css"
    shared = re.search(r'href="(/static/base\.css\?v=\w+)"', html)  # before downloads.css
    assert shared is not None and shared.start() < stylesheet.start()
    response, body = await pages.get(shared.group(1))
    assert response.status == 200 and response.content_type == "text/css"
    assert "box-sizing: border-box" in body.decode()

    views = await pages.events()
    assert [e.type for e in views] == ["link.viewed"] * 3, "a page view is never a download"
    assert views[0].message_id == first.message_id
    assert views[0].data == {
        "link_id": first.link_id,
        "recipient": PROSPECT,
        "ip": "127.0.0.1",
        "user_agent": "Phone/1.0",
    }


async def test_a_single_file_gets_no_zip_button(pages: Pages) -> None:
    made = await pages.link()
    _, body = await pages.get(made.path())
    assert made.path("/zip") not in body.decode()


async def test_names_and_subjects_are_escaped(pages: Pages) -> None:
    made = await pages.link(
        [("<script>alert(1)</script>.pdf", "application/pdf", b"x")],
        subject='<img src=x onerror="alert(2)">Angebot',
        sender='"><b>x</b>@broker.example',
    )
    response, body = await pages.get(made.path())
    html = body.decode()
    assert response.status == 200
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.pdf" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html
    assert "<b>x</b>" not in html and "&#34;&gt;&lt;b&gt;x&lt;/b&gt;@broker.example" in html


# --- files --------------------------------------------------------------------------------------


async def test_download_streams_the_original_bytes(pages: Pages) -> None:
    content = os.urandom(MB8)
    made = await pages.link([("Exposé Müllerstraße.pdf", "application/pdf", content)])
    stored = made.files[0]
    response, body = await pages.get(made.file_path(stored), headers={"User-Agent": "UA"})
    assert response.status == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(content).hexdigest()
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Content-Length"] == str(MB8)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert_security_headers(response)

    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Expose Muellerstrasse.pdf"; ')
    assert offered_filename(disposition) == "Exposé Müllerstraße.pdf"

    [event] = await pages.events()
    assert event.type == "download.first"
    assert event.message_id == made.message_id
    assert event.data == {
        "link_id": made.link_id,
        "recipient": PROSPECT,
        "ip": "127.0.0.1",
        "user_agent": "UA",
        "file_id": stored.id,
        "filename": "Exposé Müllerstraße.pdf",
    }


async def test_first_and_repeated_downloads_per_recipient(pages: Pages) -> None:
    anna = await pages.link([("Exposé.pdf", "application/pdf", b"%PDF-1.7 expose")])
    bert = await pages.link(
        recipient="bert@example.com", existing=(anna.message_id, anna.files, anna.data)
    )
    stored = anna.files[0]
    for made in (anna, anna, bert, anna):
        response, body = await pages.get(made.file_path(stored))
        assert response.status == 200 and body == b"%PDF-1.7 expose"
    events = await pages.events()
    assert [(e.type, e.data["recipient"]) for e in events] == [
        ("download.first", PROSPECT),
        ("download.repeat", PROSPECT),
        ("download.first", "bert@example.com"),
        ("download.repeat", PROSPECT),
    ]
    assert await pages.downloads(anna, stored) == 3
    assert await pages.downloads(bert, stored) == 1


async def test_parallel_downloads_have_exactly_one_first(pages: Pages) -> None:
    made = await pages.link()
    results = await asyncio.gather(*(pages.get(made.file_path(made.files[0])) for _ in range(6)))
    assert [r.status for r, _ in results] == [200] * 6
    types = sorted(e.type for e in await pages.events())
    assert types == ["download.first"] + ["download.repeat"] * 5
    assert (await chained(pages.relay.db)).ok


async def test_head_gives_headers_and_records_only_automated_visits(pages: Pages) -> None:
    made = await pages.link(
        [("a.pdf", "application/pdf", b"a" * 1000), ("b.mp4", "video/mp4", b"b" * 2000)]
    )
    response, body = await pages.request("HEAD", made.path())
    assert response.status == 200 and body == b""
    assert_security_headers(response)
    response, body = await pages.request("HEAD", made.file_path(made.files[1]))
    assert response.status == 200 and body == b""
    assert response.headers["Content-Length"] == "2000"
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "b.mp4" in response.headers["Content-Disposition"]
    assert_security_headers(response)
    response, body = await pages.request("HEAD", made.path("/zip"))
    assert response.status == 200 and body == b""
    assert int(response.headers["Content-Length"]) > 3000
    response, _ = await pages.request(
        "HEAD", made.file_path(made.files[0]), headers={"Range": "bytes=0-9"}
    )
    assert response.status == 206
    events = await pages.events()
    assert [e.type for e in events] == [
        "link.viewed",
        "download.automated",
        "download.zip",
        "download.automated",
    ]
    assert all(e.data["automated"] is True for e in events)
    assert all(e.data["automated_reasons"] == ["HEAD request"] for e in events)
    assert await pages.downloads(made, made.files[0]) == 0
    assert await pages.downloads(made, made.files[1]) == 0


async def test_ranges_and_when_they_count(pages: Pages) -> None:
    content = os.urandom(100_000)
    made = await pages.link([("Video.mp4", "video/mp4", content)])
    path = made.file_path(made.files[0])

    async def ranged(value: str, **extra: str) -> tuple[aiohttp.ClientResponse, bytes]:
        return await pages.get(path, headers={"Range": value, **extra})

    response, body = await ranged("bytes=0-99")
    assert response.status == 206 and body == content[:100]
    assert response.headers["Content-Range"] == "bytes 0-99/100000"
    assert response.headers["Content-Length"] == "100"
    assert_security_headers(response)
    assert [e.type for e in await pages.events()] == ["download.first"]

    # resuming or fetching segments further on is served but never counted
    response, body = await ranged("bytes=100-")
    assert response.status == 206 and body == content[100:]
    assert response.headers["Content-Range"] == "bytes 100-99999/100000"
    response, body = await ranged("bytes=-10")
    assert response.status == 206 and body == content[-10:]
    response, body = await ranged("bytes=99990-200000")
    assert response.status == 206 and body == content[99990:]
    assert len(await pages.events()) == 1

    for unsatisfiable in ("bytes=100000-", "bytes=200000-300000", "bytes=-0"):
        response, body = await ranged(unsatisfiable)
        assert response.status == 416, unsatisfiable
        assert response.headers["Content-Range"] == "bytes */100000"
        assert_security_headers(response)
    assert len(await pages.events()) == 1

    # several ranges, or a stale If-Range: the whole file, which is a download
    response, body = await ranged("bytes=0-9,20-29")
    assert response.status == 200 and body == content
    response, body = await ranged("bytes=500-", **{"If-Range": '"an-older-version"'})
    assert response.status == 200 and body == content
    response, body = await ranged("bytes=500-", **{"If-Range": response.headers["ETag"]})
    assert response.status == 206 and body == content[500:]
    assert [e.type for e in await pages.events()] == ["download.first"] + ["download.repeat"] * 2
    assert await pages.downloads(made, made.files[0]) == 3


def test_range_planning() -> None:
    etag = '"abc"'
    assert plan_range(None, None, etag, 10) == Served(200, 0, 10)
    assert plan_range("bytes=0-0", None, etag, 10) == Served(206, 0, 1)
    assert plan_range("bytes=-20", None, etag, 10) == Served(206, 0, 10)
    assert plan_range("bytes=-20", None, etag, 10).counts_as_download
    assert not plan_range("bytes=1-", None, etag, 10).counts_as_download
    assert plan_range("bytes=5-2", None, etag, 10) == Served(200, 0, 10)
    assert plan_range("items=0-5", None, etag, 10) == Served(200, 0, 10)
    assert plan_range("bytes=0-", None, etag, 0) == Served(416)
    assert not Served(416).counts_as_download


async def test_hostile_ranges_get_the_right_status_never_500(pages: Pages) -> None:
    content = os.urandom(1000)
    made = await pages.link([("Video.mp4", "video/mp4", content)])
    path = made.file_path(made.files[0])
    huge = "9" * 5000
    expected = {
        # numbers past any file size a server can hold are unsatisfiable (as nginx answers)
        f"bytes=0-{huge}": 416,
        f"bytes={huge}-": 416,
        f"bytes=-{huge}": 416,
        f"bytes={huge[:4000]}-{huge[:4000]}": 416,
        f"bytes=0-{2**63}": 416,
        f"bytes=0-9,{huge}-": 416,
        # every range of a set unsatisfiable: 416; a satisfiable set is answered whole
        "bytes=1000-,2000-3000": 416,
        "bytes=0-9,20-29": 200,
        "bytes=" + ",".join(f"{i}-{i}" for i in range(1000)): 200,
        "bytes=1000-,0-1": 200,
        # malformed, or a unit we do not know: ignored, the whole file
        "bytes=": 200,
        "bytes=-": 200,
        "bytes=5-2": 200,
        "bytes=a-b": 200,
        "bytes=0-1-2": 200,
        "bytes=0x10-": 200,
        "bytes=١-": 200,
        "bytes=,": 200,
        "items=0-9": 200,
        "bytes 0-9": 200,
        # one satisfiable range, however written
        f"bytes=0-{2**63 - 1}": 206,
        f"bytes={'0' * 5000}-9": 206,
        " BYTES = 10 - 19 ": 206,
    }
    for value, status in expected.items():
        for method in ("GET", "HEAD"):
            response, body = await pages.request(method, path, headers={"Range": value})
            assert response.status == status, (method, value[:40], response.status)
            assert_security_headers(response)
            if status == 416:
                assert response.headers["Content-Range"] == "bytes */1000"
            elif method == "GET" and status == 200:
                assert body == content
    response, body = await pages.get(path, headers={"Range": f"bytes=0-{2**63 - 1}"})
    assert body == content and response.headers["Content-Range"] == "bytes 0-999/1000"
    response, body = await pages.get(path, headers={"Range": " BYTES = 10 - 19 "})
    assert body == content[10:20]
    # a header longer than aiohttp's 8190-byte limit is refused before it reaches us
    response, _ = await pages.get(path, headers={"Range": "bytes=0-" + "9" * 9000})
    assert response.status == 400


# --- zip ----------------------------------------------------------------------------------------


async def test_zip_has_every_file_with_its_bytes(pages: Pages) -> None:
    files = [
        ("Exposé.pdf", "application/pdf", os.urandom(3 * 1024 * 1024)),
        ("Grundriss.pdf", "application/pdf", os.urandom(70_000)),
        ("Exposé.pdf", "application/pdf", b"a second file of the same name"),
        ("../../etc/passwd", "text/plain", b"not a path"),
    ]
    made = await pages.link(files, subject='Exposé: Villa "Seeblick"/Nord')
    response, body = await pages.get(made.path("/zip"), headers={"User-Agent": "UA"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Length"] == str(len(body))
    assert_security_headers(response)
    assert offered_filename(response.headers["Content-Disposition"]) == (
        "Exposé_ Villa _Seeblick__Nord.zip"
    )
    assert '"Expose_ Villa _Seeblick__Nord.zip"' in response.headers["Content-Disposition"]

    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names == ["Exposé.pdf", "Grundriss.pdf", "Exposé (2).pdf", "_.._etc_passwd"]
        for name, (_, _, content) in zip(names, files, strict=True):
            assert archive.read(name) == content

    [event] = await pages.events()
    assert event.type == "download.zip"
    assert event.data["recipient"] == PROSPECT
    assert event.data["ip"] == "127.0.0.1"
    assert event.data["user_agent"] == "UA"
    assert event.data["files"] == [{"file_id": f.id, "filename": f.filename} for f in made.files]
    assert await pages.downloads(made, made.files[0]) == 0, "the zip does not count per file"


async def test_zip_without_subject_is_named_in_the_link_language(pages: Pages) -> None:
    made = await pages.link(language="en", subject="")
    response, body = await pages.get(made.path("/zip"))
    assert response.status == 200
    assert 'filename="files.zip"' in response.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.namelist() == ["Exposé.pdf"]


def test_content_disposition_is_always_safe() -> None:
    for name in ('a"b.pdf', "a\r\nb.pdf", "../x.pdf", "..\\x.pdf", "\u202egpj.exe", "..", ""):
        header = content_disposition(name)
        fallback = re.match(r'attachment; filename="([^"]*)"; filename\*=UTF-8\'\'(\S+)$', header)
        assert fallback is not None, header
        assert not set(fallback.group(1)) & set('"\\/\r\n'), header
        decoded = offered_filename(header)
        assert decoded and not set(decoded) & set("/\\\r\n\u202e") and decoded != "..", header
    assert safe_filename("x" * 300 + ".pdf").endswith("x.pdf")
    assert len(safe_filename("x" * 300 + ".pdf")) == 150


async def test_an_original_no_longer_kept_leaves_the_agent_by_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `[storage] keep_originals_days` and its links' grace the original is gone, as
    intended: the expired link's page names the agent by the address the row keeps, and no
    visit logs an error for it."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    gone = Message(id="m1", sender=AGENT, blob="0" * 64, size=10, message_id_header="<a@b>")
    assert (await agent_of(blobs, gone)).label == AGENT
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize(
    ("content_type", "filename", "german"),
    [
        ("text/calendar", "Besichtigung.ics", "Kalendereintrag"),
        ("application/octet-stream", "Termin.ICS", "Kalendereintrag"),
        ("text/vcard", "Jürgen.vcf", "Kontaktkarte"),
        ("text/x-vcard", "karte", "Kontaktkarte"),
        ("text/plain", "notiz.txt", "Text"),
        ("application/pdf", "Exposé.pdf", "PDF-Dokument"),
        ("application/octet-stream", "daten.bin", "Datei"),
        ("message/rfc822", "Grundbuchauszug.eml", "E-Mail"),
        ("application/octet-stream", "Anfrage.eml", "E-Mail"),
    ],
)
def test_files_are_named_as_a_person_would_call_them(
    content_type: str, filename: str, german: str
) -> None:
    """Invitations and contact cards stay attached to every copy, so the offer page lists
    them often: "Text" would tell the prospect nothing."""
    catalogs = load_catalogs()
    kind = file_kind(content_type, filename)
    assert catalogs["de"].t(f"kind.{kind}") == german
    assert all(catalogs[language].t(f"kind.{kind}") for language in SHIPPED_LANGUAGES)


# --- expired, unknown, tricks -------------------------------------------------------------------


async def test_expired_link_is_410_in_its_language_naming_the_sender(pages: Pages) -> None:
    made = await pages.link(
        [("a.pdf", "application/pdf", b"a"), ("b.pdf", "application/pdf", b"b")],
        language="en",
        days=14,
    )
    pages.clock.advance(days=14)
    for path in (made.path(), made.file_path(made.files[0]), made.path("/zip")):
        response, body = await pages.get(path, headers={"Accept-Language": "de"})
        assert response.status == 410, path
        assert_security_headers(response)
        html, text = body.decode(), text_of(body)
        assert '<html lang="en">' in html
        assert f"This link has expired — please ask {AGENT} for a new one." in text
        assert "It was valid until 7 Dec 2026, 11:00 CET." in text
        assert f'href="mailto:{AGENT}?subject=Request%20for%20a%20new%20link%3A%20Ihr%20' in html
    assert await pages.events() == []

    # a link withdrawn before its date is just as expired
    withdrawn = await pages.link(language="es")
    async with pages.relay.db.transaction() as session:
        await session.execute(update(Link).where(Link.id == withdrawn.link_id).values(expired=True))
    response, body = await pages.get(withdrawn.path())
    assert response.status == 410
    assert f"Este enlace ha caducado: pida a {AGENT} uno nuevo." in text_of(body)


async def test_unknown_tokens_and_path_tricks_are_404(pages: Pages) -> None:
    made = await pages.link()
    other = await pages.link()
    response, body = await pages.get(f"/d/{new_token()}", headers={"Accept-Language": "es"})
    assert response.status == 404
    assert '<html lang="es">' in body.decode()
    assert "Enlace no encontrado" in text_of(body)
    response, body = await pages.get("/d/nope", headers={"Accept-Language": "fr, en;q=0.5"})
    assert response.status == 404 and '<html lang="en">' in body.decode()
    response, body = await pages.get("/d/nope", headers={"Accept-Language": "fr"})
    assert response.status == 404 and '<html lang="de">' in body.decode()
    assert "Link nicht gefunden" in text_of(body)

    tricks = [
        "/d/..%2F..%2Fetc%2Fpasswd",
        "/d/%2e%2e/%2e%2e/etc/passwd",
        f"/d/{made.token}/f/../../x",
        f"/d/{made.token}/f/..%2F..%2F..%2Fetc%2Fpasswd",
        f"/d/{made.token}/f/{other.files[0].id}",
        f"/d/{made.token}/f/{made.files[0].sha256}",
        f"/d/{made.token}/zip/../f/{made.files[0].id}x",
        f"/d/{made.token}%00",
        "/d/",
        "/d",
    ]
    for path in tricks:
        response, body = await pages.get(path)
        assert response.status == 404, path
        assert_security_headers(response)
        assert b"%PDF" not in body and b"root:" not in body, path
    assert await pages.events() == []


async def test_too_many_bad_tokens_get_429(pages: Pages) -> None:
    made = await pages.link()
    for _ in range(BAD_TOKEN_LIMIT):
        response, _ = await pages.get(f"/d/{new_token()}")
        assert response.status == 404
    response, _ = await pages.get(made.path())
    assert response.status == 200, "20 bad tokens are still allowed"
    response, _ = await pages.get(f"/d/{new_token()}")
    assert response.status == 404, "the 21st is answered, then the address is blocked"

    pages.clock.advance(minutes=2)
    for path in (f"/d/{new_token()}", made.path(), made.file_path(made.files[0])):
        response, body = await pages.get(path, headers={"Accept-Language": "en"})
        assert response.status == 429, path
        assert 420 <= int(response.headers["Retry-After"]) <= 480
        assert_security_headers(response)
        assert "Please try again in 8 minutes." in text_of(body)
    response, _ = await pages.get("/healthz")
    assert response.status == 200, "only /d/ is limited"

    pages.clock.advance(minutes=8, seconds=1)
    response, _ = await pages.get(made.path())
    assert response.status == 200
    assert [e.type for e in await pages.events()] == ["link.viewed"] * 2


def test_limiter_memory_is_bounded() -> None:
    now = [0.0]
    limiter = BadTokenLimiter(limit=2, window=60, max_addresses=3, clock=lambda: now[0])
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
        limiter.record(address)
    assert len(limiter) == 3, "the least recently seen address was evicted"
    for _ in range(3):
        limiter.record("192.0.2.4")
    assert limiter.retry_after("192.0.2.4") == 60
    now[0] = 61
    limiter.record("192.0.2.9")
    assert len(limiter) == 1, "addresses outside the window are dropped"
    assert limiter.retry_after("192.0.2.4") is None
    for suffix in ("1", "2", "3"):  # one IPv6 host, three addresses of its /64
        limiter.record(f"2001:db8:1:2::{suffix}")
    assert limiter.retry_after("2001:db8:1:2::ffff") is not None
    assert limiter.retry_after("2001:db8:1:3::1") is None


async def test_security_headers_on_every_response(pages: Pages) -> None:
    made = await pages.link(
        [("a.pdf", "application/pdf", b"a"), ("b.pdf", "application/pdf", b"b")]
    )
    for method, path in [
        ("GET", made.path()),
        ("GET", made.file_path(made.files[0])),
        ("GET", made.path("/zip")),
        ("GET", f"/d/{new_token()}"),
        ("HEAD", made.path()),
        ("POST", made.path()),
        ("DELETE", made.file_path(made.files[0])),
    ]:
        response, _ = await pages.request(method, path)
        assert response.status in {200, 404, 405}, (method, path)
        assert_security_headers(response)
    response, _ = await pages.get("/static/downloads.css")
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# --- client addresses ---------------------------------------------------------------------------


def test_client_ip_resolution() -> None:
    direct = ClientIpResolver([])
    assert direct.resolve("203.0.113.7", ["198.51.100.1"]) == "203.0.113.7"
    proxied = ClientIpResolver(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])
    assert proxied.resolve("127.0.0.1", []) == "127.0.0.1"
    assert proxied.resolve("127.0.0.1", ["198.51.100.1"]) == "198.51.100.1"
    # the client may send its own X-Forwarded-For: everything left of it is ignored
    assert proxied.resolve("127.0.0.1", ["6.6.6.6, 198.51.100.1, 10.1.2.3"]) == "198.51.100.1"
    assert proxied.resolve("127.0.0.1", ["6.6.6.6", "198.51.100.1"]) == "198.51.100.1"
    assert proxied.resolve("2001:db8::1", ["[2001:db8:ffff::2]:443, 2001:db8::3"]) == (
        "2001:db8:ffff::2"
    )
    assert proxied.resolve("::ffff:127.0.0.1", ["192.0.2.1:5555"]) == "192.0.2.1"
    assert proxied.resolve("127.0.0.1", ["garbage, 10.0.0.5"]) == "10.0.0.5"
    assert proxied.resolve("203.0.113.7", ["198.51.100.1"]) == "203.0.113.7"
    with pytest.raises(ValueError, match="trusted_proxies"):
        ClientIpResolver(["not-an-address"])


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(pages: Pages) -> None:
    made = await pages.link()
    await pages.get(made.path(), headers={"X-Forwarded-For": "198.51.100.23"})
    await pages.get(made.file_path(made.files[0]), headers={"X-Forwarded-For": "198.51.100.23"})
    assert [e.data["ip"] for e in await pages.events()] == ["127.0.0.1", "127.0.0.1"]


async def test_client_ip_from_a_trusted_proxy(
    database: Database, tmp_path: Path, clock: Clock
) -> None:
    async with running_pages(
        database, tmp_path, clock, web={"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
    ) as proxied:
        made = await proxied.link()
        xff = {"X-Forwarded-For": "6.6.6.6, 198.51.100.23, 10.0.0.2"}
        await proxied.get(made.path(), headers=xff)
        await proxied.get(made.file_path(made.files[0]), headers=xff)
        assert [e.data["ip"] for e in await proxied.events()] == ["198.51.100.23"] * 2


# --- texts --------------------------------------------------------------------------------------


def test_texts_formats_and_colours() -> None:
    catalogs = load_catalogs()
    assert set(catalogs) == set(SHIPPED_LANGUAGES)
    moment = datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert [catalogs[lang].date(moment) for lang in SHIPPED_LANGUAGES] == [
        "23.11.2026",
        "23 Nov 2026",
        "23/11/2026",
    ]
    assert [catalogs[lang].size(MB8) for lang in SHIPPED_LANGUAGES] == [
        "8,4 MB",
        "8.4 MB",
        "8,4 MB",
    ]
    assert catalogs["de"].size(532) == "532 Byte"
    assert catalogs["de"].size(123_456_789) == "123 MB"
    assert catalogs["en"].size(999_999) == "1.0 MB"
    assert negotiate("en-GB,en;q=0.9,de;q=0.8", "de") == "en"
    assert negotiate("fr-FR, es;q=0.4, de;q=0.3", "de") == "es"
    assert negotiate("", "de") == "de"
    css = branding_css(BrandingSettings(primary_color="#ffd700", background_color="#101010"))
    accent = re.search(r"--accent: (#\w+);", css)
    assert accent is not None and contrast(accent.group(1), "#ffffff") >= 4.5
    assert "--on-brand: #1b1f24;" in css, "dark text on a light brand colour"
    assert "--on-page: #f3f4f6;" in css, "light text on a dark page"


async def test_a_scanner_fetch_is_automated_and_the_person_still_downloads_first(
    pages: Pages,
) -> None:
    made = await pages.link([("a.pdf", "application/pdf", b"a" * 100)])
    scanner = {"User-Agent": "Mozilla/5.0 (compatible; Proofpoint URL Defense)"}
    for path in (made.path(), made.file_path(made.files[0]), made.path("/zip")):
        response, _ = await pages.get(path, headers=scanner)
        assert response.status == 200
    events = await pages.events()
    assert [e.type for e in events] == ["link.viewed", "download.automated", "download.zip"]
    assert all(e.data["automated"] is True for e in events)
    assert await pages.downloads(made, made.files[0]) == 0

    response, body = await pages.get(made.file_path(made.files[0]), headers={"Cookie": "a=b"})
    assert response.status == 200 and body == b"a" * 100
    person = (await pages.events())[-1]
    assert person.type == "download.first" and "automated" not in person.data
    assert await pages.downloads(made, made.files[0]) == 1


async def test_a_revoked_link_answers_access_ended(pages: Pages) -> None:
    made = await pages.link(language="en")
    await pages.relay.links.revoke(made.message_id, PROSPECT, "anna@broker.example")
    for path in (made.path(), made.file_path(made.files[0]), made.path("/zip")):
        response, body = await pages.get(path)
        assert response.status == 410
        text = body.decode()
        assert "Access ended" in text and "expired" not in text
    assert await pages.downloads(made, made.files[0]) == 0
