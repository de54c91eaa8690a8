"""The prospect's download page: `/d/{token}`, each file behind it, and all of them as a zip.

What a visitor's request has the link desk (gateway/links/desk.py) write to the journal:
- `GET /d/{token}` of a valid link: `link.viewed` (a page view never counts as a download).
- `GET /d/{token}/f/{file_id}`: `download.first` for the link's first download of that file,
  `download.repeat` after that; the desk makes sure two parallel requests cannot both be
  "first". Only a response that delivers the file from
  byte 0 counts: a plain 200, or a 206 whose range starts at 0. A browser resuming a broken
  download, or a download manager fetching segments, asks for ranges further on; those
  are served but not counted, so one download is one count however it was transported.
- `GET /d/{token}/zip`: `download.zip` listing the files; it does not count per file.
- HEAD, and any request that looks like a link scanner's (rules/automated_visits.py: a
  scanner's user agent, or a data-centre address within seconds of delivery without
  cookies), is journaled as automated: a view marked so, `download.automated` for a file,
  which never counts. A person on a data-centre VPN after that window counts as a person.
- A link an agent ended (revoked) answers 410 "access ended", in its own words.

Unknown and expired tokens get a friendly page (404 / 410, web/token_pages.py) and are
remembered per client address by the site's `BadTokenLimiter` (web/pages.py), which also
adds the security headers and holds the texts, templates and branding these pages share
with the letter's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from zipstream import ZipStream

from gateway.links.desk import LinkDesk, LinkExpired
from gateway.links.tokens import Closed, FoundLink
from gateway.store.blobs import BlobMissing, BlobReader, BlobStore, StoreUnavailable
from gateway.store.models import StoredFile
from rules.registered_letter import without_tag
from web.blobs import PulledBlob, send_blob, send_pulled
from web.guard import Routes
from web.pages import (
    BAD_TOKEN_LIMIT,
    SECURITY_HEADERS,
    SEGMENT,
    BadTokenLimiter,
    ProspectSite,
    agent_of,
    branding_css,
    content_disposition,
    contrast,
    file_badge,
    file_kind,
    safe_filename,
)
from web.pages import content_type as _content_type
from web.token_pages import TokenFamily

__all__ = [
    "BAD_TOKEN_LIMIT",
    "SECURITY_HEADERS",
    "BadTokenLimiter",
    "DownloadPages",
    "Served",
    "branding_css",
    "content_disposition",
    "contrast",
    "plan_range",
    "safe_filename",
]

log = logging.getLogger(__name__)


# --- ranges ---------------------------------------------------------------------------------


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


_UNIT = re.compile(r"\s*bytes\s*=", re.IGNORECASE | re.ASCII)
_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*", re.ASCII)
_LAST_POSITION = 2**63 - 1  # no file is larger; a number past it is unsatisfiable, as in nginx


class _PastAnyFile(Exception):
    """A position with more digits than any file size: the request is unsatisfiable."""


def plan_range(range_header: str | None, if_range: str | None, etag: str, size: int) -> Served:
    """RFC 9110 §14: one byte range gets 206, an unsatisfiable one 416, anything else 200.

    Several ranges are answered with the whole file (as a server may), or 416 when none of
    them is satisfiable; an unknown unit, a malformed value or a stale `If-Range` with the
    whole file. A position past 2**63 - 1 is 416: no file reaches it, and converting its
    thousands of digits would itself be the failure.
    """
    whole = Served(200, 0, size)
    if range_header is None or (if_range is not None and if_range.strip() != etag):
        return whole
    unit = _UNIT.match(range_header)
    if unit is None:
        return whole
    specs = [spec for spec in range_header[unit.end() :].split(",") if spec.strip()]
    try:
        planned = [_plan_spec(spec, size) for spec in specs]
    except _PastAnyFile:
        return Served(416)
    if not planned or None in planned:
        return whole
    if len(planned) == 1:
        return planned[0] or whole
    return Served(416) if all(p is not None and p.status == 416 for p in planned) else whole


def _plan_spec(spec: str, size: int) -> Served | None:
    """One byte-range-spec as 206 or 416, or None when it is malformed."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        return None
    first, last = (_position(digits) for digits in match.groups())
    if first is None:
        if last is None:
            return None
        if last == 0 or size == 0:
            return Served(416)
        start = max(0, size - last)
        return Served(206, start, size - start)
    if last is not None and last < first:
        return None
    if first >= size:
        return Served(416)
    end = size - 1 if last is None else min(last, size - 1)
    return Served(206, first, end - first + 1)


def _position(digits: str) -> int | None:
    if not digits:
        return None
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(_LAST_POSITION)) or int(significant) > _LAST_POSITION:
        raise _PastAnyFile(digits)
    return int(significant)


# --- the pages --------------------------------------------------------------------------------


class DownloadPages:
    """The handlers of /d/; texts, templates, limiter and client addresses come from the site,
    every write from the link desk."""

    def __init__(self, site: ProspectSite, links: LinkDesk, blobs: BlobStore) -> None:
        self.site = site
        self.links = links
        self.blobs = blobs
        self.base = site.base
        self.render = site.render
        self.visitor = site.visitor
        self.not_found = site.not_found
        self.tokens = TokenFamily(site, LinkExpired, self.expired, count_closed=True)

    def register(self, routes: Routes) -> None:
        token = f"{{token:{SEGMENT}}}"
        routes.public("GET", f"/d/{token}", self.page)
        routes.public("GET", f"/d/{token}/f/{{file_id:{SEGMENT}}}", self.file)
        routes.public("GET", f"/d/{token}/zip", self.zip)
        routes.public("GET", "/d", self.unknown)
        routes.public("GET", "/d/{tail:.*}", self.unknown)

    # -- handlers

    async def unknown(self, request: web.Request) -> web.Response:
        return self.site.unknown_token(request)

    async def page(self, request: web.Request) -> web.StreamResponse:
        found = await self.tokens.open(request, self.links.find(request.match_info["token"]))
        visitor = self.visitor(request)
        await self.links.record_view(
            found,
            visitor.ip,
            visitor.user_agent,
            method=visitor.method,
            has_cookie=visitor.has_cookie,
        )
        catalog = self.site.catalog(found.link.language)
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
            title=self.subject(found) or catalog.t("download.title"),
            subject=self.subject(found),
            sender=(await agent_of(self.blobs, found.message)).label,
            expires=catalog.moment(found.link.expires_at),
            files=files,
            total=catalog.size(sum(stored.size for stored in found.files)),
            zip_url=f"{here}/zip",
        )

    async def file(self, request: web.Request) -> web.StreamResponse:
        found = await self.tokens.open(request, self.links.find(request.match_info["token"]))
        return await self.serve_file(request, found, request.match_info["file_id"])

    async def serve_file(
        self, request: web.Request, found: FoundLink, file_id: str
    ) -> web.StreamResponse:
        """One file of a valid link, counted as a download as the module says; the letter's
        offer page serves the linked files of its held copy through here too."""
        stored = next((f for f in found.files if f.id == file_id), None)
        if stored is None:
            return self.not_found(request, self.site.catalog(found.link.language))
        catalog = self.site.catalog(found.link.language)
        async with contextlib.AsyncExitStack() as held:
            try:
                blob = await held.enter_async_context(self.blobs.open(stored.sha256))
            except StoreUnavailable as exc:
                log.warning("file %s not served, blob store unavailable: %s", stored.id, exc)
                return self.site.unavailable(request, catalog)
            except (BlobMissing, ValueError) as exc:  # gone from the store, or not a digest
                log.error("blob %s of file %s is missing: %s", stored.sha256, stored.id, exc)
                return self.not_found(request, catalog)
            return await self.send_stored(request, found, stored, blob)

    async def send_stored(
        self, request: web.Request, found: FoundLink, stored: StoredFile, blob: BlobReader
    ) -> web.StreamResponse:
        etag = f'"{stored.sha256}"'
        served = plan_range(
            request.headers.get("Range"), request.headers.get("If-Range"), etag, blob.size
        )
        if served.counts_as_download:
            visitor = self.visitor(request)
            await self.links.record_download(
                found,
                stored,
                visitor.ip,
                visitor.user_agent,
                method=visitor.method,
                has_cookie=visitor.has_cookie,
            )
        response = web.StreamResponse(status=served.status)
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["ETag"] = etag
        if served.status == 416:
            response.headers["Content-Range"] = f"bytes */{blob.size}"
            response.content_length = 0
            await response.prepare(request)
            return response
        response.headers["Content-Type"] = _content_type(stored.content_type)
        response.headers["Content-Disposition"] = content_disposition(stored.filename)
        if served.status == 206:
            last = served.start + served.length - 1
            response.headers["Content-Range"] = f"bytes {served.start}-{last}/{blob.size}"
        response.content_length = served.length
        await response.prepare(request)
        if request.method != "HEAD":
            await send_blob(request, response, blob, served.start, served.length)
            await response.write_eof()
        return response

    async def zip(self, request: web.Request) -> web.StreamResponse:
        found = await self.tokens.open(request, self.links.find(request.match_info["token"]))
        catalog = self.site.catalog(found.link.language)
        if not found.files:
            return self.not_found(request, catalog)
        try:
            archive = await self.build_zip(found.files)
        except StoreUnavailable as exc:
            log.warning("zip of link %s not served, blob store unavailable: %s", found.link.id, exc)
            return self.site.unavailable(request, catalog)
        except (BlobMissing, ValueError) as exc:
            log.error("zip of link %s cannot be built, a blob is missing: %s", found.link.id, exc)
            return self.not_found(request, catalog)
        visitor = self.visitor(request)
        await self.links.record_zip(
            found,
            visitor.ip,
            visitor.user_agent,
            method=visitor.method,
            has_cookie=visitor.has_cookie,
        )
        name = safe_filename(self.subject(found), "") or catalog.t("download.zip_name")
        response = web.StreamResponse()
        response.headers["Content-Type"] = "application/zip"
        response.headers["Content-Disposition"] = content_disposition(f"{name}.zip")
        response.headers["Accept-Ranges"] = "none"
        response.content_length = len(archive)
        await response.prepare(request)
        if request.method != "HEAD":
            await send_pulled(response, iter(archive))
            await response.write_eof()
        return response

    # -- helpers

    async def build_zip(self, files: list[StoredFile]) -> ZipStream:
        """A sized, uncompressed zip of the files; nothing is read until it is iterated."""
        archive = ZipStream(sized=True)
        taken: set[str] = set()
        loop = asyncio.get_running_loop()
        for stored in files:
            name = _unique(safe_filename(stored.filename), taken)
            size = await self.blobs.size(stored.sha256)
            archive.add(PulledBlob(self.blobs, stored.sha256, loop), name, size=size)
        return archive

    def subject(self, found: FoundLink) -> str:
        """The message's subject without the tag that made it an offer: never the prospect's."""
        return without_tag(found.message.subject, tuple(self.site.settings.letter.tags))

    async def expired(self, request: web.Request, closed: LinkExpired) -> web.Response:
        """410 in the link's language, naming the sender and how to ask them again; a
        revoked link's page says access ended instead."""
        found = closed.found
        catalog = self.site.catalog(found.link.language)
        agent = await agent_of(self.blobs, found.message)
        if closed.reason is Closed.REVOKED:
            return self.site.access_ended(request, catalog, agent)
        sender, subject = agent.address, self.subject(found)
        mail_subject = catalog.t("error.expired_mail_subject", subject=subject).rstrip(": ")
        return self.render(
            request,
            "error.html",
            catalog,
            status=410,
            title=catalog.t("error.expired_title"),
            message=(
                catalog.t("error.expired", sender=agent.called)
                if sender
                else catalog.t("error.expired_no_sender")
            ),
            detail=catalog.t("error.expired_since", date=catalog.moment(found.link.expires_at)),
            mail_to=(
                f"mailto:{quote(sender, safe='@')}?subject={quote(mail_subject, safe='')}"
                if sender
                else None
            ),
            mail_label=catalog.t("error.expired_mail", sender=agent.called),
        )


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name (2)` and so on, so two files of the same name both land in a zip."""
    candidate, n = name, 1
    stem, ext = os.path.splitext(name)
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem} ({n}){ext}"
    taken.add(candidate.lower())
    return candidate
