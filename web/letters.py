"""The prospect's registered-letter pages: consent at `/l/{token}`, then the offer.

Routes and what they write (nothing else is ever written by a visitor's request):

- `GET /l/{token}`: the consent texts of the letter's snapshot, a box per declaration and the
  button with the block set's exact label (§ 312j (3) BGB). Writes one `letter.viewed`
  event and nothing else: mail scanners fetch links, so a GET never consents. A released
  letter gets a short "already opened" page instead (still `letter.viewed`). A HEAD, or a
  request that looks like a link scanner's, is a view marked `automated`.
- `POST /l/{token}` (fields `csrf` and the ticked block ids): no or a wrong CSRF token, or an
  `Origin` that is not ours: 403, nothing written. Required boxes missing: the page again
  with what is missing, 422, nothing written. Otherwise `LetterDesk.release` (one
  transaction, idempotent, locked) and `303 See Other` to the offer page; a POST after
  release is a 303 there too and changes nothing.
- `GET /l/{token}/offer`: the released offer as the prospect got it by mail: subject, body
  (HTML sanitized with nh3, or the text), attachments. Before release: 303 to the letter.
  An offer the agent released without consent shows no declarations and no PDF.
- `GET /l/{token}/a/{part}`: one attachment of the held copy, decoded; inline images of the
  HTML body are served here too (their `cid:` references point here).
- `GET /l/{token}/f/{file}`: a file the held copy carries as a download link (the large
  exposé), listed with the attachments; served and counted as its download page does.
- `GET /l/{token}/consent.pdf`: the consent record as PDF, at any time after release.
- `POST /l/{token}/renew` (CSRF protected, only for an expired letter): asks the agent for a
  new link (gateway/letters/renewal.py: one mail per letter per 24 hours) and says so.

Unknown tokens get the download pages' 404 and count against the client's address; an
expired letter gets 410 in its language with the button to ask the agent for a new link
(the shared flow of web/token_pages.py; the letter's expired page does not count). A
letter whose link an agent ended (revoked, or re-sent with a fresh link) gets 410 "access
ended" and no offer of a new link, not even by POSTing to /renew.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

import nh3
from aiohttp import web
from markupsafe import Markup, escape

from gateway.letters.blocks import markdown_html
from gateway.letters.desk import (
    ConsentIncomplete,
    FoundLetter,
    LetterDesk,
    LetterExpired,
    LetterUnknown,
)
from gateway.links.desk import LinkDesk
from gateway.links.tokens import Closed, FoundLink
from gateway.mail import headers, mime
from gateway.store.blobs import BlobMissing, BlobStore, StoreUnavailable
from gateway.store.models import Letter, Message
from gateway.texts.catalog import Catalog
from web.csrf import KEY_FILE, FormTokens
from web.downloads import DownloadPages
from web.guard import Routes
from web.pages import (
    SEGMENT,
    ProspectSite,
    agent_of,
    content_disposition,
    content_type,
    file_badge,
    file_kind,
    safe_filename,
)
from web.raised_page import RaisedPage
from web.token_pages import TokenFamily

log = logging.getLogger(__name__)

PART = r"[0-9]{1,4}(?:\.[0-9]{1,4}){0,19}"  # a MIME part id: "2", "1.3"
BODY_MAX = 2 * 1024 * 1024  # characters of a body shown on the page
_URL_IN_TEXT = re.compile(r"https?://[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")
_FORM_FIELDS_MAX = 100
CHUNK_SIZE = 256 * 1024

# What of an offer's HTML body survives: structure and text, links as links, no scripts,
# forms, frames, styles or event handlers, and no image that would load from elsewhere.
_ALLOWED_TAGS = set(nh3.ALLOWED_TAGS) - {"area", "map"}
_ALLOWED_ATTRIBUTES = {
    tag: set(attributes) for tag, attributes in nh3.ALLOWED_ATTRIBUTES.items() if tag != "area"
}
_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid", "data"}
_READ_AS_WINDOWS_1252 = frozenset(
    {"us-ascii", "ascii", "iso-8859-1", "iso8859-1", "iso_8859-1", "latin1", "latin-1", "l1"}
)


@dataclass(frozen=True)
class OfferPart:
    """An attachment (or inline image) of the held copy, as the pages list and serve it."""

    id: str
    filename: str
    content_type: str
    size: int
    listed: bool


class LetterPages:
    """The handlers of /l/; every write goes through the letter desk."""

    def __init__(
        self, site: ProspectSite, letters: LetterDesk, links: LinkDesk, blobs: BlobStore
    ) -> None:
        settings = site.settings
        self.settings = settings
        self.site = site
        self.letters = letters
        self.links = links
        self.blobs = blobs
        self.downloads = DownloadPages(site, links, blobs)
        self.forms = FormTokens(settings.storage.path.parent / KEY_FILE, settings.server.public_url)
        self.tokens = TokenFamily(site, LetterExpired, self.expired, count_closed=False)

    def register(self, routes: Routes) -> None:
        token = f"{{token:{SEGMENT}}}"
        routes.public("GET", f"/l/{token}", self.letter)
        routes.public("POST", f"/l/{token}", self.consent)
        routes.public("GET", f"/l/{token}/offer", self.offer)
        routes.public("GET", f"/l/{token}/a/{{part:{PART}}}", self.attachment)
        routes.public("GET", f"/l/{token}/f/{{file_id:{SEGMENT}}}", self.linked_file)
        routes.public("GET", f"/l/{token}/consent.pdf", self.consent_pdf)
        routes.public("POST", f"/l/{token}/renew", self.renew)
        routes.public("GET", "/l", self.unknown)
        routes.public("GET", "/l/{tail:.*}", self.unknown)

    # -- handlers

    async def unknown(self, request: web.Request) -> web.Response:
        return self.site.unknown_token(request)

    async def letter(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        visitor = self.site.visitor(request)
        await self.letters.record_view(
            found,
            visitor.ip,
            visitor.user_agent,
            method=visitor.method,
            has_cookie=visitor.has_cookie,
        )
        catalog = self.site.catalog(found.letter.language)
        if found.released:
            return await self.render_released(request, token, found, catalog)
        return await self.render_letter(request, token, found, catalog)

    async def consent(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        catalog = self.site.catalog(found.letter.language)
        form = await self.checked_form(request, token, catalog)
        if found.released:
            raise web.HTTPSeeOther(self.url(token, "/offer"))
        checked = {name for name in form if name != "csrf"}
        visitor = self.site.visitor(request)
        try:
            await self.letters.release(token, checked, visitor.ip, visitor.user_agent)
        except ConsentIncomplete as incomplete:
            return await self.render_letter(
                request,
                token,
                found,
                catalog,
                status=422,
                checked=checked,
                missing={block.id for block in incomplete.missing},
            )
        except LetterExpired as expired:  # it expired between our look and the release
            return await self.render_expired(request, token, expired, catalog)
        except BlobMissing as missing:
            return await self.gone(request, found, catalog, "offer", missing)
        except StoreUnavailable as exc:
            return self.unavailable(request, found, catalog, exc)
        raise web.HTTPSeeOther(self.url(token, "/offer"))

    async def offer(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        if not found.released:
            raise web.HTTPSeeOther(self.url(token))
        catalog = self.site.catalog(found.letter.language)
        try:
            raw = await self.blobs.read(found.letter.held_blob)
        except BlobMissing as missing:
            return await self.gone(request, found, catalog, "offer", missing)
        except StoreUnavailable as exc:
            return self.unavailable(request, found, catalog, exc)
        held = await asyncio.to_thread(read_offer, raw)
        parts = held.parts
        inline = {cid: self.url(token, f"/a/{part_id}") for cid, part_id in held.inline.items()}
        files = [
            {
                "name": part.filename,
                "badge": file_badge(part.filename),
                "kind": catalog.t(f"kind.{file_kind(part.content_type, part.filename)}"),
                "size": catalog.size(part.size),
                "url": self.url(token, f"/a/{part.id}"),
            }
            for part in parts.values()
            if part.listed
        ]
        linked = await self.linked(found)
        files += [
            {
                "name": stored.filename,
                "badge": file_badge(stored.filename),
                "kind": catalog.t(f"kind.{file_kind(stored.content_type, stored.filename)}"),
                "size": catalog.size(stored.size),
                "url": self.url(token, f"/f/{quote(stored.id, safe='')}"),
            }
            for stored in (linked.files if linked else [])
        ]
        sizes = [part.size for part in parts.values() if part.listed]
        sizes += [stored.size for stored in (linked.files if linked else [])]
        html, text = held.html, held.text
        given = found.consent.given_at if found.consent else found.letter.released_at
        given = given or found.letter.created_at
        return self.site.render(
            request,
            "offer.html",
            catalog,
            title=found.letter.subject or catalog.t("offer.eyebrow"),
            subject=found.letter.subject,
            agent=await self.agent_label(found),
            released=catalog.t(
                "offer.released", date=catalog.date(given), time=catalog.time(given)
            ),
            files=files,
            count=catalog.plural("download.count", len(files)),
            total=catalog.size(sum(sizes)),
            body=sanitized_html(html, inline) if html is not None else None,
            text=linked_text(text) if text is not None else None,
            pdf_url=self.url(token, "/consent.pdf") if found.consent else None,
        )

    async def attachment(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        catalog = self.site.catalog(found.letter.language)
        if not found.released:
            raise web.HTTPSeeOther(self.url(token))
        try:
            raw = await self.blobs.read(found.letter.held_blob)
        except BlobMissing as missing:
            return await self.gone(request, found, catalog, "offer", missing)
        except StoreUnavailable as exc:
            return self.unavailable(request, found, catalog, exc)
        wanted = request.match_info["part"]
        found_part = await asyncio.to_thread(decoded_part, raw, wanted)
        if found_part is None:
            return self.site.not_found(request, catalog)
        part, data = found_part
        return await self.send_bytes(request, data, content_type(part.content_type), part.filename)

    async def linked_file(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        if not found.released:
            raise web.HTTPSeeOther(self.url(token))
        linked = await self.linked(found)
        if linked is None:
            return self.site.not_found(request, self.site.catalog(found.letter.language))
        return await self.downloads.serve_file(request, linked, request.match_info["file_id"])

    async def linked(self, found: FoundLetter) -> FoundLink | None:
        """The held copy's valid download link for this recipient, if it has one."""
        return await self.links.recipient_link(found.message, found.letter.recipient)

    async def consent_pdf(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.find(request, token)
        if found.consent is None:
            raise web.HTTPSeeOther(self.url(token))
        catalog = self.site.catalog(found.letter.language)
        try:
            data = await self.blobs.read(found.consent.pdf_blob)
        except BlobMissing as missing:
            return await self.gone(request, found, catalog, "pdf", missing)
        except StoreUnavailable as exc:
            return self.unavailable(request, found, catalog, exc)
        name = catalog.t("offer.consent_filename", subject=found.letter.subject)
        return await self.send_bytes(request, data, "application/pdf", f"{name}.pdf")

    async def renew(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        try:
            await self.letters.find(token)
        except LetterUnknown:
            return self.site.unknown_token(request)
        except LetterExpired as expired:
            return await self.ask_for_new_link(request, token, expired)
        # the link is valid (or the letter released): its page is the place to go
        raise web.HTTPSeeOther(self.url(token))

    async def ask_for_new_link(
        self, request: web.Request, token: str, expired: LetterExpired
    ) -> web.StreamResponse:
        catalog = self.site.catalog(expired.letter.language)
        if expired.reason is Closed.REVOKED:
            return self.site.access_ended(
                request, catalog, await agent_of(self.blobs, expired.message)
            )
        await self.checked_form(request, token, catalog)
        sent = await self.letters.request_new_link(
            expired.letter, expired.message, self.site.visitor(request).ip
        )
        if not sent:  # the visitor is not told: the agent simply is not asked twice a day
            log.info("new link for letter %s asked for again within 24 h", expired.letter.id)
        agent = await self.agent_name(expired.letter, expired.message)
        return self.site.render(
            request,
            "error.html",
            catalog,
            title=catalog.t("letter.renewed_title"),
            message=catalog.t("letter.renewed", agent=agent, subject=expired.letter.subject),
            detail=catalog.t("letter.renewed_hint"),
        )

    # -- looking up, checking, recording

    async def find(self, request: web.Request, token: str) -> FoundLetter:
        """The letter; an unknown (404) or expired (410) token raises its page."""
        return await self.tokens.open(request, self.letters.find(token))

    async def expired(self, request: web.Request, expired: LetterExpired) -> web.Response:
        catalog = self.site.catalog(expired.letter.language)
        return await self.render_expired(request, request.match_info["token"], expired, catalog)

    async def checked_form(self, request: web.Request, token: str, catalog: Catalog) -> set[str]:
        """The posted field names; a wrong CSRF token or Origin raises the 403 page."""
        form: dict[str, str] = {}
        if self.forms.origin_allowed(request.headers.get("Origin")):
            try:
                posted = await request.post()
            except ValueError:
                posted = None
            if posted is not None:
                for name, value in list(posted.items())[:_FORM_FIELDS_MAX]:
                    if isinstance(value, str):
                        form.setdefault(name, value)
        if not form or not self.forms.valid(token, form.get("csrf")):
            raise RaisedPage(
                self.site.render(
                    request,
                    "error.html",
                    catalog,
                    status=403,
                    title=catalog.t("letter.forbidden_title"),
                    message=catalog.t("letter.forbidden"),
                )
            )
        return set(form)

    # -- rendering

    async def render_letter(
        self,
        request: web.Request,
        token: str,
        found: FoundLetter,
        catalog: Catalog,
        *,
        status: int = 200,
        checked: set[str] | None = None,
        missing: set[str] | None = None,
    ) -> web.Response:
        checked, missing = checked or set(), missing or set()
        blocks = [
            {
                "id": block.id,
                "title": block.title,
                "html": Markup(markdown_html(block.text)),  # noqa: S704 (raw HTML is off)
                "checkbox": block.checkbox,
                "checked": block.id in checked,
                "missing": block.id in missing,
            }
            for block in found.blocks
        ]
        return self.site.render(
            request,
            "letter.html",
            catalog,
            status=status,
            title=found.letter.subject or catalog.t("letter.eyebrow"),
            subject=found.letter.subject,
            agent=await self.agent_label(found),
            expires=catalog.moment(found.link.expires_at),
            blocks=blocks,
            checks=[block for block in blocks if block["checkbox"]],
            missing=[block for block in blocks if block["missing"]],
            button=found.letter.button,
            action=self.url(token),
            csrf=self.forms.token_for(token),
        )

    async def render_released(
        self, request: web.Request, token: str, found: FoundLetter, catalog: Catalog
    ) -> web.Response:
        if found.consent is None:  # the agent released it (LetterDesk.release_by_agent)
            at = found.letter.released_at or found.letter.created_at
            return self.site.render(
                request,
                "letter_released.html",
                catalog,
                title=catalog.t("letter.agent_released_title"),
                subject=found.letter.subject,
                given=catalog.t(
                    "letter.agent_released",
                    agent=await self.agent_name(found.letter, found.message),
                    date=catalog.date(at),
                    time=catalog.time(at),
                ),
                offer_url=self.url(token, "/offer"),
                pdf_url=None,
            )
        given = found.consent.given_at
        return self.site.render(
            request,
            "letter_released.html",
            catalog,
            title=catalog.t("letter.done_title"),
            subject=found.letter.subject,
            given=catalog.t("letter.done", date=catalog.date(given), time=catalog.time(given)),
            offer_url=self.url(token, "/offer"),
            pdf_url=self.url(token, "/consent.pdf"),
        )

    async def render_expired(
        self, request: web.Request, token: str, expired: LetterExpired, catalog: Catalog
    ) -> web.Response:
        if expired.reason is Closed.REVOKED:
            return self.site.access_ended(
                request, catalog, await agent_of(self.blobs, expired.message)
            )
        until = expired.expires_at
        agent = await self.agent_name(expired.letter, expired.message)
        return self.site.render(
            request,
            "letter_expired.html",
            catalog,
            status=410,
            title=catalog.t("letter.expired_title"),
            message=catalog.t(
                "letter.expired_text", subject=expired.letter.subject, date=catalog.moment(until)
            ),
            hint=catalog.t("letter.expired_hint", agent=agent),
            button=catalog.t("letter.renew", agent=agent),
            action=self.url(token, "/renew"),
            csrf=self.forms.token_for(token),
        )

    async def gone(
        self,
        request: web.Request,
        found: FoundLetter,
        catalog: Catalog,
        what: str,
        missing: BlobMissing,
    ) -> web.Response:
        """410 naming what is no longer stored (`offer` or `pdf`); the details go to the log."""
        log.error(
            "letter %s: the %s is missing from the blob store (%s)",
            found.letter.id,
            "held original" if what == "offer" else "consent PDF",
            missing.digest,
        )
        agent = await self.agent_name(found.letter, found.message)
        return self.site.render(
            request,
            "error.html",
            catalog,
            status=410,
            title=catalog.t("letter.gone_title"),
            message=catalog.t(f"letter.gone_{what}", subject=found.letter.subject),
            detail=catalog.t("letter.gone_hint", agent=agent),
        )

    def unavailable(
        self, request: web.Request, found: FoundLetter, catalog: Catalog, exc: StoreUnavailable
    ) -> web.Response:
        """503 while the blob store cannot be reached: the letter's files are not gone."""
        log.warning("letter %s not served, blob store unavailable: %s", found.letter.id, exc)
        return self.site.unavailable(request, catalog)

    async def send_bytes(
        self, request: web.Request, data: bytes, ctype: str, filename: str
    ) -> web.StreamResponse:
        response = web.StreamResponse()
        response.headers["Content-Type"] = ctype
        response.headers["Content-Disposition"] = content_disposition(filename)
        response.content_length = len(data)
        await response.prepare(request)
        if request.method != "HEAD":
            view = memoryview(data)
            for start in range(0, len(data), CHUNK_SIZE):
                await response.write(view[start : start + CHUNK_SIZE])
            await response.write_eof()
        return response

    # -- helpers

    def url(self, token: str, suffix: str = "") -> str:
        return f"{self.site.base}/l/{quote(token, safe='')}{suffix}"

    async def agent_label(self, found: FoundLetter) -> str:
        """ "Anna Agent (agent@broker.example)", as the download page introduces them too."""
        return (await agent_of(self.blobs, found.message)).label

    async def agent_name(self, letter: Letter, message: Message) -> str:
        return (await agent_of(self.blobs, message)).called


# --- the offer's body and parts ------------------------------------------------------------


@dataclass(frozen=True)
class HeldOffer:
    """What the offer page shows of the held copy."""

    parts: dict[str, OfferPart]
    inline: dict[str, str]  # Content-ID -> part id
    html: str | None
    text: str | None


def read_offer(raw: bytes) -> HeldOffer:
    """The held copy taken apart for the page (CPU work: run it in a thread)."""
    root = mime.parse(raw)
    html, text = body_of(raw, root)
    return HeldOffer(offer_parts(raw, root), inline_images(root), html, text)


def decoded_part(raw: bytes, part_id: str) -> tuple[OfferPart, bytes] | None:
    """One servable part of the held copy and its decoded bytes, or None."""
    root = mime.parse(raw)
    part = offer_parts(raw, root).get(part_id)
    tree = next((p for p in root.walk() if p.id == part_id), None)
    if part is None or tree is None:
        return None
    return part, mime.decoded_body(raw, tree)


def offer_parts(raw: bytes, root: mime.MimePart) -> dict[str, OfferPart]:
    """The attachments the page lists, plus the inline images the HTML body shows."""
    facts = mime.part_facts(raw, root)
    inline = set(inline_images(root).values())
    tree = {part.id: part for part in root.walk()}
    parts = {}
    for fact in facts:
        if not (fact.is_attachment or fact.id in inline):
            continue
        parts[fact.id] = OfferPart(
            id=fact.id,
            filename=safe_filename(fact.filename or mime.name_for_unnamed(raw, tree[fact.id])),
            content_type=fact.content_type,
            size=fact.size,
            listed=fact.is_attachment,
        )
    return parts


def inline_images(root: mime.MimePart) -> dict[str, str]:
    """Content-ID (without brackets) -> part id of the images an HTML body may show."""
    return {
        part.content_id.strip("<> "): part.id
        for part in root.walk()
        if part.content_id and part.content_type.startswith("image/") and not part.children
    }


def body_of(raw: bytes, root: mime.MimePart) -> tuple[str | None, str | None]:
    """The first HTML and the first text body that are not attachments, decoded."""
    facts = {fact.id: fact for fact in mime.part_facts(raw, root)}
    html = text = None
    for part in root.walk():
        fact = facts.get(part.id)
        if fact is None or fact.is_attachment:
            continue
        if part.content_type == "text/html" and html is None:
            html = _decode(raw, part)
        elif part.content_type == "text/plain" and text is None:
            text = _decode(raw, part)
    return html, text


def _decode(raw: bytes, part: mime.MimePart) -> str:
    """A body read as a browser reads its label (WHATWG's Encoding Standard: ASCII and
    ISO-8859-1 are Windows-1252, whose € and „“ Outlook writes under them); without a
    label, or with one Python does not know, UTF-8 if it is valid, else Windows-1252."""
    data = mime.decoded_body(raw, part)
    label = part.params.get("charset", "").strip().strip('"').lower()
    codec = "cp1252" if label in _READ_AS_WINDOWS_1252 else label
    try:
        text = data.decode(codec, errors="replace") if codec else None
    except LookupError:
        text = None
    return (text if text is not None else headers.utf8_or_windows_1252(data))[:BODY_MAX]


def sanitized_html(html: str, inline: dict[str, str]) -> Markup:
    """The agent's HTML with nothing active left: no script, style, form, frame or handler;
    links stay links; images only from the message itself (cid:) or data: URIs."""

    def keep(tag: str, attribute: str, value: str) -> str | None:
        if tag == "img" and attribute == "src":
            if value.lower().startswith("cid:"):
                return inline.get(unquote(value[4:]).strip("<> "))
            return value if value.lower().startswith("data:image/") else None
        if attribute in ("href", "cite") and value.lower().startswith(("data:", "cid:")):
            return None
        return value

    cleaned = nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        clean_content_tags={"script", "style", "title", "noscript", "template"},
        attributes=_ALLOWED_ATTRIBUTES,
        attribute_filter=keep,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )
    return Markup(cleaned)  # noqa: S704 (sanitized just above)


def linked_text(text: str) -> Markup:
    """Plain text, escaped, with its web addresses made into links."""
    text = text.replace("\r\n", "\n")
    pieces, position = [], 0
    for match in _URL_IN_TEXT.finditer(text):
        pieces.append(escape(text[position : match.start()]))
        pieces.append(
            Markup(
                '<a href="{0}" target="_blank" rel="noopener noreferrer nofollow">{0}</a>'
            ).format(match.group(0))
        )
        position = match.end()
    pieces.append(escape(text[position:]))
    return Markup("").join(pieces)
