"""What every prospect page shares: texts, templates, branding, client addresses, headers.

The download pages (`/d/`) and the registered letter's pages (`/l/`) are built on one
`ProspectSite`, created once per web application:

- `render` fills a template from web/templates with the page language's catalog, the
  brokerage's branding and the versioned stylesheets;
- `visitor` says who is asking (the client address behind our trusted proxies, the browser);
- the bad-token limiter: an address that presented more than 20 unknown tokens within ten
  minutes gets 429 for every prospect request until its window has room again. It lives in
  this process's memory, so with several web instances each keeps its own window;
- security headers are added in `on_response_prepare`, the one hook that sees every response
  before its headers go out, including streamed files and aiohttp's own 404/405 answers (a
  middleware would come too late for a StreamResponse that has already sent its headers).

The letter pages send `Referrer-Policy: same-origin` instead of `no-referrer`: under
`no-referrer` browsers send `Origin: null` with a form POST, and the consent form checks that
the Origin is ours. `same-origin` still sends nothing to any other site.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
import re
import time
import unicodedata
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web

from gateway.config import BrandingSettings, Settings
from gateway.mail import headers
from gateway.store.blobs import BlobMissing, BlobStore, StoreUnavailable
from gateway.store.models import Message
from gateway.texts.catalog import Catalog, load_catalogs, negotiate
from rules.language import shipped_language
from web.client_ip import ClientIpResolver
from web.guard import Routes

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

BAD_TOKEN_LIMIT = 20
BAD_TOKEN_WINDOW = 600.0  # seconds
USER_AGENT_MAX = 512
HEADER_PEEK = 64 * 1024  # enough of the original to read the agent's From
STORE_RETRY_AFTER = 60  # seconds a page asks to wait while the blob store cannot be reached
BUSY_RETRY_AFTER = 5  # seconds a page asks to wait while the visits' database share is in use

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' https: data:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
}
FORM_SECURITY_HEADERS = {**SECURITY_HEADERS, "Referrer-Policy": "same-origin"}
PROSPECT_PREFIXES = ("/d", "/l")
FORM_PREFIX = "/l"
ASSET_PATHS = ("/static/", "/branding.css")
SEGMENT = r"[A-Za-z0-9_-]{1,100}"  # what tokens and file ids are made of
_MIME_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")


async def robots(request: web.Request) -> web.Response:
    """Every page here is one person's (a link, a letter, the console): no crawler that asks
    should fetch any of them. The pages say noindex too, for those that never ask."""
    return web.Response(text="User-agent: *\nDisallow: /\n", content_type="text/plain")


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


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


# --- file names and kinds -------------------------------------------------------------------

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


def content_type(value: str) -> str:
    """A Content-Type to answer with: the file's own when well formed, else octet-stream."""
    return value if _MIME_TYPE.match(value) else "application/octet-stream"


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
    if ctype == "text/calendar" or ext == ".ics":
        return "calendar"
    if ctype in {"text/vcard", "text/x-vcard", "text/directory"} or ext == ".vcf":
        return "contact"
    if major == "message" or ext in {".eml", ".msg"}:
        return "message"
    if major == "text":
        return "text"
    return "other"


def file_badge(filename: str) -> str:
    """The short extension shown in the file's icon, e.g. PDF or MP4."""
    ext = os.path.splitext(filename)[1][1:]
    return ext.upper()[:4] if ext.isascii() and ext.isalnum() else ""


# --- colours --------------------------------------------------------------------------------


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


# --- the agent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    """The agent as the prospect knows them from the mail: the name in its From, the address.

    Every prospect page names them the same way: `label` where a page introduces them,
    `called` in a sentence that asks the prospect to turn to them (the address then goes
    behind a mail button, where it is useful).
    """

    name: str
    address: str

    @property
    def label(self) -> str:
        """'Anna Agent (anna@broker.example)', or whichever of the two there is."""
        if self.name and self.address and self.name != self.address:
            return f"{self.name} ({self.address})"
        return self.address or self.name

    @property
    def called(self) -> str:
        return self.name or self.address


# per blob store, (original's digest, sender) -> Agent: an original never changes under its
# digest, and every view of a link or letter page names the agent, which otherwise reads
# and parses up to HEADER_PEEK bytes of the original each time
_AGENTS: weakref.WeakKeyDictionary[BlobStore, OrderedDict[tuple[str, str], Agent]] = (
    weakref.WeakKeyDictionary()
)
AGENTS_KEPT = 1024


async def agent_of(blobs: BlobStore, message: Message) -> Agent:
    """The agent of `message`, named as the intake kept it. A message stored before the
    name was kept (`sender_name` null) has it read from the From of the original as
    received (remembered for the last AGENTS_KEPT originals; an original that could not be
    read is not remembered)."""
    if message.sender_name is not None:
        return Agent(message.sender_name, message.sender)
    kept = _AGENTS.get(blobs)
    if kept is None:
        kept = _AGENTS[blobs] = OrderedDict()
    key = (message.blob, message.sender)
    known = kept.get(key)
    if known is not None:
        kept.move_to_end(key)
        return known
    agent = await _read_agent(blobs, message)
    if agent is not None:
        kept[key] = agent
        if len(kept) > AGENTS_KEPT:
            kept.popitem(last=False)
        return agent
    return Agent("", message.sender)


async def _read_agent(blobs: BlobStore, message: Message) -> Agent | None:
    """The agent from the original's From; None when the original cannot be read. An
    original gone past `[storage] keep_originals_days` (its links long expired) leaves the
    address alone."""
    try:
        peek = await blobs.read_start(message.blob, HEADER_PEEK)
    except BlobMissing:
        log.debug("original %s of message %s is no longer kept", message.blob, message.id)
        return Agent("", message.sender)
    except StoreUnavailable as exc:
        log.warning("blob store unavailable, the agent's name is left out: %s", exc)
        return None
    except (OSError, ValueError) as exc:
        log.error("original %s of message %s: %s", message.blob, message.id, exc)
        return None
    block, _ = headers.split_message(peek)
    return Agent(headers.sender_name(headers.parse_fields(block), message.sender), message.sender)


# --- the site -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visitor:
    """A request's client as the desks judge it (a person or a link scanner)."""

    ip: str
    user_agent: str
    method: str = "GET"
    has_cookie: bool = False


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


class ProspectSite:
    """Texts, templates, branding, limiter and client addresses for every prospect page."""

    def __init__(
        self,
        settings: Settings,
        limiter: BadTokenLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.catalogs = load_catalogs(zone=settings.branding.timezone)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.client_ips = ClientIpResolver(settings.web.trusted_proxies)
        self.limiter = limiter or BadTokenLimiter(clock=clock)
        # links on the pages carry public_url's path, for a proxy that serves us under one
        self.base = urlsplit(settings.server.public_url).path.rstrip("/")
        self.brand_css = branding_css(settings.branding)
        # versioned URLs, so browsers may cache the stylesheets until they change
        css_version = digest((STATIC / "downloads.css").read_bytes())
        base_version = digest((STATIC / "base.css").read_bytes())
        self.assets = {
            "base_css": self.url(f"/static/base.css?v={base_version}"),
            "css": self.url(f"/static/downloads.css?v={css_version}"),
            "brand_css": self.url(f"/branding.css?v={digest(self.brand_css.encode())}"),
        }

    def url(self, path: str) -> str:
        """Where the browser reaches one of our paths: public_url's path in front of it.

        A proxy that serves the relay under a path strips it before we see the request, so
        routes and request.path stay "/console/..."; every link, form and redirect the
        browser follows is made here, so none of them can leave the prefix off.
        """
        assert path.startswith("/"), path
        return self.base + path

    def register(self, routes: Routes) -> None:
        routes.public("GET", "/branding.css", self.branding)
        routes.public("GET", "/robots.txt", robots)
        routes.public_static("/static/", STATIC)
        routes.app.middlewares.append(self.rate_limit)
        routes.app.on_response_prepare.append(self.add_headers)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        path = request.path
        if under(path, FORM_PREFIX):
            response.headers.update(FORM_SECURITY_HEADERS)
            response.headers["Cache-Control"] = "no-store"
        elif any(under(path, prefix) for prefix in PROSPECT_PREFIXES):
            response.headers.update(SECURITY_HEADERS)
            response.headers["Cache-Control"] = "no-store"
        elif path.startswith(ASSET_PATHS):
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "public, max-age=86400")

    @web.middleware
    async def rate_limit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if any(under(request.path, prefix) for prefix in PROSPECT_PREFIXES):
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

    async def branding(self, request: web.Request) -> web.Response:
        return web.Response(text=self.brand_css, content_type="text/css", charset="utf-8")

    def visitor(self, request: web.Request) -> Visitor:
        ip = self.client_ips.resolve(request.remote, request.headers.getall("X-Forwarded-For", []))
        return Visitor(
            ip,
            request.headers.get("User-Agent", "")[:USER_AGENT_MAX],
            request.method,
            bool(request.headers.get("Cookie", "").strip()),
        )

    def catalog(self, language: str) -> Catalog:
        """A link's language; one we no longer ship gets `[policy] language`."""
        return self.catalogs[shipped_language(language, self.settings.policy.language)]

    def catalog_for(self, request: web.Request) -> Catalog:
        """The browser's language, for pages that belong to no link (unknown, too many)."""
        language = negotiate(
            request.headers.get("Accept-Language", ""), self.settings.policy.language
        )
        return self.catalogs[language]

    def access_ended(self, request: web.Request, catalog: Catalog, agent: Agent) -> web.Response:
        """410 for a link an agent ended (revoked): polite, its own words, never an offer of
        a new link; the prospect is pointed to the agent."""
        named = bool(agent.called)
        return self.render(
            request,
            "error.html",
            catalog,
            status=410,
            title=catalog.t("error.revoked_title"),
            message=(
                catalog.t("error.revoked", sender=agent.called)
                if named
                else catalog.t("error.revoked_no_sender")
            ),
            detail=(
                catalog.t("error.revoked_hint", sender=agent.label)
                if named
                else catalog.t("error.revoked_hint_no_sender")
            ),
        )

    def unknown_token(self, request: web.Request) -> web.Response:
        """404 in the browser's language; counts against the client's address."""
        self.limiter.record(self.visitor(request).ip)
        return self.not_found(request, self.catalog_for(request))

    def not_found(self, request: web.Request, catalog: Catalog) -> web.Response:
        return self.render(
            request,
            "error.html",
            catalog,
            status=404,
            title=catalog.t("error.not_found_title"),
            message=catalog.t("error.not_found"),
        )

    def unavailable(self, request: web.Request, catalog: Catalog) -> web.Response:
        """503 while the blob store cannot be reached: the file is not gone, so the page
        asks the prospect to come back (Retry-After), never says "not found"."""
        return self._come_back(request, catalog, "error.unavailable", STORE_RETRY_AFTER)

    def busy(self, request: web.Request, catalog: Catalog) -> web.Response:
        """503 while the visits' share of the database is in use (gateway/store/admission.py):
        turned away at once, so the relay's own work keeps its connections."""
        return self._come_back(request, catalog, "error.busy", BUSY_RETRY_AFTER)

    def _come_back(
        self, request: web.Request, catalog: Catalog, message: str, after: int
    ) -> web.Response:
        response = self.render(
            request,
            "error.html",
            catalog,
            status=503,
            title=catalog.t("error.unavailable_title"),
            message=catalog.t(message),
        )
        response.headers["Retry-After"] = str(after)
        return response

    def render(
        self,
        request: web.Request,
        template: str,
        catalog: Catalog,
        *,
        status: int = 200,
        **context: object,
    ) -> web.Response:
        context.setdefault("detail", None)
        context.setdefault("mail_to", None)
        context.setdefault(
            "referrer", "same-origin" if under(request.path, FORM_PREFIX) else "no-referrer"
        )
        html = self.templates.get_template(template).render(
            lang=catalog.language,
            t=catalog.t,
            plural=catalog.plural,
            brand=self.settings.branding,
            assets=self.assets,
            url=self.url,
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
