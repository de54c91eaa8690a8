"""The prospect's download page: `/d/{token}`, each file behind it, and all of them as a zip.

What a visitor's request writes to the journal:
- `GET /d/{token}` of a valid link: `link.viewed` (a page view never counts as a download).
- `GET /d/{token}/f/{file_id}`: `download.first` for the link's first download of that file,
  `download.repeat` after that. The choice is made by `UPDATE link_files SET downloads =
  downloads + 1 ... RETURNING downloads` in the same transaction as the event, so two
  parallel requests cannot both be "first". Only a response that delivers the file from
  byte 0 counts: a plain 200, or a 206 whose range starts at 0. A browser resuming a broken
  download, or a download manager fetching segments, asks for ranges further on; those
  are served but not counted, so one download is one count however it was transported.
- `GET /d/{token}/zip`: `download.zip` listing the files; it does not count per file.
- HEAD never writes anything.

Unknown and expired tokens get a friendly page (404 / 410) and are remembered per client
address by `BadTokenLimiter`; an address that presented more than 20 of them within ten
minutes gets 429 for every /d/ request, valid tokens included, until its window has room
again. The limiter lives in this process's memory: with several web instances behind a load
balancer each keeps its own window, so the effective limit is up to that many times higher.

Security headers are added in `on_response_prepare`, the one hook that sees every response
before its headers go out, including streamed files and aiohttp's own 404/405 answers (a
middleware would come too late for a StreamResponse that has already sent its headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import os
import re
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from sqlalchemy import update
from zipstream import ZipStream

from gateway import journal
from gateway.config import BrandingSettings
from gateway.i18n import LANGUAGES, Catalog, load_catalogs, negotiate
from gateway.links import FoundLink, LinkState, find_link
from gateway.models import LinkFile, StoredFile
from gateway.relay import Relay
from web.client_ip import ClientIpResolver

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

BAD_TOKEN_LIMIT = 20
BAD_TOKEN_WINDOW = 600.0  # seconds
CHUNK_SIZE = 256 * 1024
USER_AGENT_MAX = 512

SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' https: data:;"
        " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}
PROSPECT_PREFIX = "/d"
ASSET_PATHS = ("/static/", "/branding.css")
_MIME_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
_SEGMENT = r"[A-Za-z0-9_-]{1,100}"  # what tokens and file ids are made of


# --- rate limiting --------------------------------------------------------------------------


class BadTokenLimiter:
    """Remembers, per client address, when it presented unknown or expired tokens.

    Memory is bounded: each address keeps at most `limit + 1` timestamps, at most
    `max_addresses` addresses are tracked (the least recently seen go first), and addresses
    whose last bad token left the window are dropped as new ones arrive. IPv6 clients are
    counted per /64, since one host usually has a whole /64 to choose from.
    """

    def __init__(
        self,
        limit: int = BAD_TOKEN_LIMIT,
        window: float = BAD_TOKEN_WINDOW,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self.clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None when it is not blocked."""
        key = _limit_key(address)
        times = self._seen.get(key)
        if times is None:
            return None
        now = self.clock()
        self._forget_before(times, now - self.window)
        if not times:
            del self._seen[key]
            return None
        if len(times) <= self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window - now))

    def record(self, address: str) -> None:
        key, now = _limit_key(address), self.clock()
        times = self._seen.pop(key, None) or deque(maxlen=self.limit + 1)
        times.append(now)
        self._seen[key] = times
        horizon = now - self.window
        while self._seen:
            oldest_key, oldest = next(iter(self._seen.items()))
            if len(self._seen) <= self.max_addresses and oldest[-1] >= horizon:
                break
            del self._seen[oldest_key]

    def __len__(self) -> int:
        return len(self._seen)

    @staticmethod
    def _forget_before(times: deque[float], horizon: float) -> None:
        while times and times[0] < horizon:
            times.popleft()


def _limit_key(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


# --- file names, ranges, colours: small pure helpers -----------------------------------------

_TRANSLITERATE = str.maketrans(
    {"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss"}
)
# path separators, and what Windows refuses in a file name
_UNSAFE_IN_NAMES = frozenset('/\\<>:"|?*')
_NOT_FALLBACK_SAFE = re.compile(r"[^A-Za-z0-9 ._()+,=@~-]")
FILENAME_MAX = 150


def safe_filename(name: str, default: str = "download") -> str:
    """A name to offer for saving: no path separators, control or format characters,
    nothing Windows refuses, no leading dots (so never `..`)."""
    name = unicodedata.normalize("NFC", name)
    name = "".join(
        "_" if ch in _UNSAFE_IN_NAMES else ch for ch in name if unicodedata.category(ch)[0] != "C"
    )
    name = " ".join(name.split()).strip(". ")
    if len(name) > FILENAME_MAX:
        stem, ext = os.path.splitext(name)
        ext = ext if len(ext) <= 16 else ""
        name = stem[: FILENAME_MAX - len(ext)].rstrip(". ") + ext
    return name or default


def ascii_filename(name: str, default: str = "download") -> str:
    """The plain `filename=` fallback: ASCII only, no quotes, backslashes or separators."""
    text = unicodedata.normalize("NFKD", name.translate(_TRANSLITERATE))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = " ".join(_NOT_FALLBACK_SAFE.sub("_", text).split()).strip(". ")
    return text or default


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback and the exact name per RFC 6266 / RFC 5987."""
    name = safe_filename(name)
    return (
        f"attachment; filename=\"{ascii_filename(name)}\"; filename*=UTF-8''{quote(name, safe='')}"
    )


@dataclass(frozen=True)
class Served:
    """What a GET of a file answers: status, first byte and length of the body."""

    status: int
    start: int = 0
    length: int = 0

    @property
    def counts_as_download(self) -> bool:
        """A download is a response that delivers the file from its first byte."""
        return self.status in (200, 206) and self.start == 0


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE | re.ASCII)


def plan_range(range_header: str | None, if_range: str | None, etag: str, size: int) -> Served:
    """RFC 9110 §14: one byte range gets 206, an unsatisfiable one 416, anything else 200.

    Several ranges, an unknown unit or a malformed value are answered with the whole file,
    as a server may; so is a stale `If-Range`.
    """
    whole = Served(200, 0, size)
    if range_header is None or (if_range is not None and if_range.strip() != etag):
        return whole
    match = _RANGE.match(range_header)
    if match is None:
        return whole
    first, last = match.groups()
    if not first:
        if not last:
            return whole
        suffix = int(last)
        if suffix == 0 or size == 0:
            return Served(416)
        start = max(0, size - suffix)
        return Served(206, start, size - start)
    start = int(first)
    if last and int(last) < start:
        return whole
    if start >= size:
        return Served(416)
    end = min(int(last), size - 1) if last else size - 1
    return Served(206, start, end - start + 1)


def file_kind(content_type: str, filename: str) -> str:
    """A key under [kind] in the texts: what a person would call the file."""
    ctype = content_type.lower()
    ext = os.path.splitext(filename)[1].lower()
    major = ctype.partition("/")[0]
    if ctype == "application/pdf" or ext == ".pdf":
        return "pdf"
    if major in {"image", "video", "audio"}:
        return major
    if any(word in ctype for word in ("spreadsheet", "excel")) or ext in {".xlsx", ".xls"}:
        return "spreadsheet"
    if any(word in ctype for word in ("presentation", "powerpoint")) or ext in {".pptx"}:
        return "presentation"
    if any(word in ctype for word in ("word", "opendocument.text", "rtf")) or ext == ".docx":
        return "document"
    if any(word in ctype for word in ("zip", "compressed", "x-tar", "gzip", "rar")):
        return "archive"
    if major == "text":
        return "text"
    return "other"


def file_badge(filename: str) -> str:
    """The short extension shown in the file's icon, e.g. PDF or MP4."""
    ext = os.path.splitext(filename)[1][1:]
    return ext.upper()[:4] if ext.isascii() and ext.isalnum() else ""


def _luminance(colour: str) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    """The WCAG contrast ratio of two #rrggbb colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def readable_on(background: str, light: str = "#ffffff", dark: str = "#1b1f24") -> str:
    return light if contrast(background, light) >= contrast(background, dark) else dark


def darken_until_readable(colour: str, background: str = "#ffffff", ratio: float = 4.5) -> str:
    """`colour`, darkened just enough to be read as text or an outline on `background`."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    current = colour
    while contrast(current, background) < ratio and (r or g or b):
        r, g, b = int(r * 0.9), int(g * 0.9), int(b * 0.9)
        current = f"#{r:02x}{g:02x}{b:02x}"
    return current


def branding_css(brand: BrandingSettings) -> str:
    """The brokerage's colours as CSS variables; served as a file, as the CSP forbids inline."""
    primary, background = brand.primary_color.lower(), brand.background_color.lower()
    return (
        ":root {\n"
        f"  --brand: {primary};\n"
        f"  --on-brand: {readable_on(primary)};\n"
        f"  --accent: {darken_until_readable(primary)};\n"
        f"  --page: {background};\n"
        f"  --on-page: {readable_on(background, '#f3f4f6', '#1b1f24')};\n"
        "}\n"
    )


# --- the pages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visitor:
    ip: str
    user_agent: str


class DownloadPages:
    """The handlers of /d/ plus what they share: texts, templates, limiter, client IPs."""

    def __init__(self, relay: Relay, limiter: BadTokenLimiter | None = None) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.catalogs = load_catalogs()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.client_ips = ClientIpResolver(self.settings.web.trusted_proxies)
        self.limiter = limiter or BadTokenLimiter(clock=lambda: relay.clock().timestamp())
        # links on the pages carry public_url's path, for a proxy that serves us under one
        self.base = urlsplit(self.settings.server.public_url).path.rstrip("/")
        self.brand_css = branding_css(self.settings.branding)
        # versioned URLs, so browsers may cache the stylesheets until they change
        css_version = _digest((STATIC / "downloads.css").read_bytes())
        self.assets = {
            "css": f"{self.base}/static/downloads.css?v={css_version}",
            "brand_css": f"{self.base}/branding.css?v={_digest(self.brand_css.encode())}",
        }

    # -- wiring

    def register(self, app: web.Application) -> None:
        token = f"{{token:{_SEGMENT}}}"
        router = app.router
        router.add_get(f"/d/{token}", self.page)
        router.add_get(f"/d/{token}/f/{{file_id:{_SEGMENT}}}", self.file)
        router.add_get(f"/d/{token}/zip", self.zip)
        router.add_get("/d", self.unknown)
        router.add_get("/d/{tail:.*}", self.unknown)
        router.add_get("/branding.css", self.branding)
        router.add_static("/static/", STATIC)
        app.middlewares.append(self.rate_limit)
        app.on_response_prepare.append(self.add_headers)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        path = request.path
        if path == PROSPECT_PREFIX or path.startswith(PROSPECT_PREFIX + "/"):
            response.headers.update(SECURITY_HEADERS)
            response.headers["Cache-Control"] = "no-store"
        elif path.startswith(ASSET_PATHS):
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "public, max-age=86400")

    @web.middleware
    async def rate_limit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path == PROSPECT_PREFIX or path.startswith(PROSPECT_PREFIX + "/"):
            retry_after = self.limiter.retry_after(self.visitor(request).ip)
            if retry_after is not None:
                catalog = self.catalog_for(request)
                response = self.render(
                    request,
                    "error.html",
                    catalog,
                    status=429,
                    title=catalog.t("error.too_many_title"),
                    message=catalog.t("error.too_many", minutes=math.ceil(retry_after / 60)),
                )
                response.headers["Retry-After"] = str(retry_after)
                return response
        return await handler(request)

    # -- handlers

    async def branding(self, request: web.Request) -> web.Response:
        return web.Response(text=self.brand_css, content_type="text/css", charset="utf-8")

    async def unknown(self, request: web.Request) -> web.Response:
        return self.bad_link(request, None)

    async def page(self, request: web.Request) -> web.StreamResponse:
        now = self.relay.clock()
        visitor = self.visitor(request)
        async with self.relay.db.transaction() as session:
            found = await find_link(session, request.match_info["token"], now)
            if found is not None and found.state is LinkState.VALID and _is_get(request):
                event = journal.NewEvent(
                    "link.viewed",
                    found.link.message_id,
                    data=self.event_data(found, visitor),
                )
                await journal.append(session, [event], now)
        if found is None or found.state is not LinkState.VALID:
            return self.bad_link(request, found)
        catalog = self.catalogs[_language(found.link.language)]
        token = request.match_info["token"]
        here = f"{self.base}/d/{quote(token, safe='')}"
        files = [
            {
                "name": stored.filename,
                "badge": file_badge(stored.filename),
                "kind": catalog.t(f"kind.{file_kind(stored.content_type, stored.filename)}"),
                "size": catalog.size(stored.size),
                "url": f"{here}/f/{quote(stored.id, safe='')}",
            }
            for stored in found.files
        ]
        return self.render(
            request,
            "download.html",
            catalog,
            title=found.message.subject or catalog.t("download.title"),
            subject=found.message.subject,
            sender=found.message.sender,
            expires=catalog.date(found.link.expires_at),
            files=files,
            total=catalog.size(sum(stored.size for stored in found.files)),
            zip_url=f"{here}/zip",
        )

    async def file(self, request: web.Request) -> web.StreamResponse:
        now = self.relay.clock()
        visitor = self.visitor(request)
        async with self.relay.db.transaction() as session:
            found = await find_link(session, request.match_info["token"], now)
        if found is None or found.state is not LinkState.VALID:
            return self.bad_link(request, found)
        file_id = request.match_info["file_id"]
        stored = next((f for f in found.files if f.id == file_id), None)
        if stored is None:
            return self.not_found(request, self.catalogs[_language(found.link.language)])
        try:
            blob = await asyncio.to_thread(_open_blob, self.relay.blobs.path(stored.sha256))
        except (OSError, ValueError) as exc:  # gone from the store, or not a digest at all
            log.error("blob %s of file %s cannot be read: %s", stored.sha256, stored.id, exc)
            return self.not_found(request, self.catalogs[_language(found.link.language)])
        try:
            size = os.fstat(blob.fileno()).st_size
            etag = f'"{stored.sha256}"'
            served = plan_range(
                request.headers.get("Range"), request.headers.get("If-Range"), etag, size
            )
            if _is_get(request) and served.counts_as_download:
                await self.record_download(found, stored, visitor, now)
            response = web.StreamResponse(status=served.status)
            response.headers["Accept-Ranges"] = "bytes"
            response.headers["ETag"] = etag
            if served.status == 416:
                response.headers["Content-Range"] = f"bytes */{size}"
                response.content_length = 0
                await response.prepare(request)
                return response
            response.headers["Content-Type"] = _content_type(stored.content_type)
            response.headers["Content-Disposition"] = content_disposition(stored.filename)
            if served.status == 206:
                last = served.start + served.length - 1
                response.headers["Content-Range"] = f"bytes {served.start}-{last}/{size}"
            response.content_length = served.length
            await response.prepare(request)
            if request.method != "HEAD":
                await _send_file(response, blob, served.start, served.length)
                await response.write_eof()
            return response
        finally:
            blob.close()

    async def zip(self, request: web.Request) -> web.StreamResponse:
        now = self.relay.clock()
        visitor = self.visitor(request)
        async with self.relay.db.transaction() as session:
            found = await find_link(session, request.match_info["token"], now)
        if found is None or found.state is not LinkState.VALID:
            return self.bad_link(request, found)
        catalog = self.catalogs[_language(found.link.language)]
        if not found.files:
            return self.not_found(request, catalog)
        try:
            archive = await asyncio.to_thread(self.build_zip, found.files)
        except (OSError, ValueError) as exc:
            log.error("zip of link %s cannot be built: %s", found.link.id, exc)
            return self.not_found(request, catalog)
        if _is_get(request):
            async with self.relay.db.transaction() as session:
                data = self.event_data(found, visitor)
                data["files"] = [{"file_id": f.id, "filename": f.filename} for f in found.files]
                event = journal.NewEvent("download.zip", found.link.message_id, data=data)
                await journal.append(session, [event], now)
        name = safe_filename(found.message.subject, "") or catalog.t("download.zip_name")
        response = web.StreamResponse()
        response.headers["Content-Type"] = "application/zip"
        response.headers["Content-Disposition"] = content_disposition(f"{name}.zip")
        response.headers["Accept-Ranges"] = "none"
        response.content_length = len(archive)
        await response.prepare(request)
        if request.method != "HEAD":
            await _send_chunks(response, iter(archive))
            await response.write_eof()
        return response

    # -- helpers

    def build_zip(self, files: list[StoredFile]) -> ZipStream:
        """A sized, uncompressed zip of the files; nothing is read until it is iterated."""
        archive = ZipStream(sized=True)
        taken: set[str] = set()
        for stored in files:
            name = _unique(safe_filename(stored.filename), taken)
            archive.add_path(str(self.relay.blobs.path(stored.sha256)), name, recurse=False)
        return archive

    async def record_download(
        self, found: FoundLink, stored: StoredFile, visitor: Visitor, now: datetime
    ) -> None:
        async with self.relay.db.transaction() as session:
            downloads = (
                await session.execute(
                    update(LinkFile)
                    .where(LinkFile.link_id == found.link.id, LinkFile.file_id == stored.id)
                    .values(downloads=LinkFile.downloads + 1)
                    .returning(LinkFile.downloads)
                )
            ).scalar_one_or_none()
            if downloads is None:  # the link lost the file since we looked
                return
            data = self.event_data(found, visitor)
            data.update(file_id=stored.id, filename=stored.filename)
            event = journal.NewEvent(
                "download.first" if downloads == 1 else "download.repeat",
                found.link.message_id,
                data=data,
            )
            await journal.append(session, [event], now)

    def visitor(self, request: web.Request) -> Visitor:
        ip = self.client_ips.resolve(request.remote, request.headers.getall("X-Forwarded-For", []))
        return Visitor(ip, request.headers.get("User-Agent", "")[:USER_AGENT_MAX])

    @staticmethod
    def event_data(found: FoundLink, visitor: Visitor) -> dict[str, Any]:
        return {
            "link_id": found.link.id,
            "recipient": found.link.recipient,
            "ip": visitor.ip,
            "user_agent": visitor.user_agent,
        }

    def catalog_for(self, request: web.Request) -> Catalog:
        language = negotiate(
            request.headers.get("Accept-Language", ""), self.settings.policy.language or "de"
        )
        return self.catalogs[language]

    def bad_link(self, request: web.Request, found: FoundLink | None) -> web.Response:
        """Unknown: 404 in the browser's language. Expired: 410 in the link's, naming the sender.

        Both count against the client's address; an unknown token never reveals whether
        it once existed.
        """
        self.limiter.record(self.visitor(request).ip)
        if found is None:
            return self.not_found(request, self.catalog_for(request))
        catalog = self.catalogs[_language(found.link.language)]
        sender, subject = found.message.sender, found.message.subject
        mail_subject = catalog.t("error.expired_mail_subject", subject=subject).rstrip(": ")
        return self.render(
            request,
            "error.html",
            catalog,
            status=410,
            title=catalog.t("error.expired_title"),
            message=(
                catalog.t("error.expired", sender=sender)
                if sender
                else catalog.t("error.expired_no_sender")
            ),
            detail=catalog.t("error.expired_since", date=catalog.date(found.link.expires_at)),
            mail_to=(
                f"mailto:{quote(sender, safe='@')}?subject={quote(mail_subject, safe='')}"
                if sender
                else None
            ),
            mail_label=catalog.t("error.expired_mail", sender=sender),
        )

    def not_found(self, request: web.Request, catalog: Catalog) -> web.Response:
        return self.render(
            request,
            "error.html",
            catalog,
            status=404,
            title=catalog.t("error.not_found_title"),
            message=catalog.t("error.not_found"),
        )

    def render(
        self,
        request: web.Request,
        template: str,
        catalog: Catalog,
        *,
        status: int = 200,
        **context: Any,
    ) -> web.Response:
        context.setdefault("detail", None)
        context.setdefault("mail_to", None)
        html = self.templates.get_template(template).render(
            lang=catalog.language,
            t=catalog.t,
            plural=catalog.plural,
            brand=self.settings.branding,
            assets=self.assets,
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _is_get(request: web.Request) -> bool:
    return request.method == "GET"


def _language(language: str) -> str:
    return language if language in LANGUAGES else LANGUAGES[0]


def _content_type(value: str) -> str:
    return value if _MIME_TYPE.match(value) else "application/octet-stream"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name (2)` and so on, so two files of the same name both land in a zip."""
    candidate, n = name, 1
    stem, ext = os.path.splitext(name)
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem} ({n}){ext}"
    taken.add(candidate.lower())
    return candidate


def _open_blob(path: Path) -> IO[bytes]:
    return path.open("rb")


async def _send_file(
    response: web.StreamResponse, blob: IO[bytes], start: int, length: int
) -> None:
    """Copy `length` bytes from `start` in chunks; file reads run in a thread."""

    def read(size: int) -> bytes:
        return blob.read(size)

    await asyncio.to_thread(blob.seek, start)
    remaining = length
    while remaining > 0:
        chunk = await asyncio.to_thread(read, min(CHUNK_SIZE, remaining))
        if not chunk:
            raise OSError(f"blob ended {remaining} bytes early")
        await response.write(chunk)
        remaining -= len(chunk)


async def _send_chunks(response: web.StreamResponse, chunks: Iterator[bytes]) -> None:
    """Drain a blocking byte iterator (the zip) in a thread, about CHUNK_SIZE at a time."""

    def take() -> bytes:
        parts, total = [], 0
        for part in chunks:
            parts.append(part)
            total += len(part)
            if total >= CHUNK_SIZE:
                break
        return b"".join(parts)

    while chunk := await asyncio.to_thread(take):
        await response.write(chunk)
