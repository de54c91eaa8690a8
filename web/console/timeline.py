"""The console's reading pages: the timeline of messages, one message's story per recipient,
and the letters waiting for consent.

Each page asks a desk with the caller's scope and renders; a message outside the scope gets
the same 404 page as one that does not exist. Views a link scanner made (journaled with
`automated`, or `download.automated`) are listed apart per recipient and never as a download.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.access import Permission
from gateway.console.timeline import (
    BadCursor,
    EventRow,
    MessageFilter,
    MessageStory,
    RecipientState,
    Timeline,
)
from gateway.console.waiting import WaitingLetters
from gateway.links.desk import MAX_DAYS
from gateway.store.events import (
    CONSENT_GIVEN,
    DELIVERY_BOUNCED,
    DELIVERY_DELIVERED,
    DELIVERY_QUEUED,
    DOWNLOAD_AUTOMATED,
    DOWNLOAD_FIRST,
    DOWNLOAD_REPEAT,
    DOWNLOAD_ZIP,
    LETTER_HELD,
    LETTER_RELEASED,
    LETTER_RELEASED_BY_AGENT,
    LETTER_RESENT,
    LINK_CREATED,
    LINK_EXTENDED,
    LINK_REVOKED,
    POLICY_KEPT,
    WINMAIL_UNPACKED,
)
from gateway.store.models import LinkKind
from gateway.texts.catalog import Catalog
from rules.automated_visits import PROVIDER_NAMES, Reason
from web.console.paths import LETTERS, MESSAGES
from web.console.view import ConsoleView
from web.guard import Routes

SEARCH_MAX = 200
# noise on a recipient's story: every copy is queued before it is delivered or bounces
QUIET = frozenset({DELIVERY_QUEUED.name})


@dataclass(frozen=True)
class Line:
    """One event as the page shows it: when, what, and its facts as (label, value) pairs."""

    seq: int | None  # None while the journal has not chained the event yet
    at: str
    label: str
    kind: str  # a css hook: "download", "consent", "bounce", "action", ""
    facts: list[tuple[str, str]]
    download: tuple[str, str] | None = None  # (href, label) of a document the event made


VALID_UNTIL = time(23, 59)  # a link extended to a day is valid to its last minute


@dataclass
class RecipientView:
    address: str
    state: RecipientState
    lines: list[Line] = field(default_factory=list)
    scanner: list[Line] = field(default_factory=list)
    letters: list[str] = field(default_factory=list)  # letter ids
    consents: list[str] = field(default_factory=list)  # letter ids with a consent PDF
    released: list[str] = field(default_factory=list)  # letter ids with a released original
    # a released copy not delivered yet: its original is the unsigned copy as queued
    released_pending: bool = False
    links: list[str] = field(default_factory=list)  # download link ids
    has_links: bool = False


def automated(event: EventRow) -> bool:
    return event.type == DOWNLOAD_AUTOMATED.name or event.data.get("automated") is True


def reason_said(text: str, catalog: Catalog) -> str:
    """A journaled reason (English, rules/automated_visits.py) in the reader's language; a
    text the rules never wrote as it is."""
    reason = Reason.read(text)
    if reason is None:
        return text
    if reason.kind == "network" and reason.detail == "configured":
        return catalog.t("work.automated.network_configured", seconds=reason.seconds)
    provider = PROVIDER_NAMES.get(reason.detail, reason.detail)
    return catalog.t(f"work.automated.{reason.kind}", network=provider, seconds=reason.seconds)


def describe(event: EventRow, catalog: Catalog) -> Line:
    """The event's label and facts in the reader's language; times in the branding zone."""
    data = event.data
    key = event.type.replace(".", "_")
    try:
        label = catalog.t(f"work.event.{key}")
    except KeyError:  # a type declared after these pages were written: its name
        label = event.type
    facts: list[tuple[str, str]] = []

    def fact(name: str, value: object) -> None:
        if value is None or value == "" or value == []:
            return
        facts.append((catalog.t(f"work.fact.{name}"), str(value)))

    def when(value: object) -> str | None:
        if not isinstance(value, str):
            return None
        try:
            return catalog.moment(datetime.fromisoformat(value))
        except ValueError:
            return value

    fact("file", data.get("filename"))
    if event.type == DOWNLOAD_ZIP.name:
        fact("files", ", ".join(f.get("filename", "") for f in data.get("files", [])))
    if event.type in (LINK_CREATED.name, WINMAIL_UNPACKED.name):
        fact("files", ", ".join(data.get("files", [])))
    fact("error", data.get("error"))
    fact("status", data.get("status") if event.type == DELIVERY_BOUNCED.name else None)
    fact("remote", data.get("remote"))
    fact("route", data.get("route"))
    fact("actor", data.get("actor"))
    fact("reason", data.get("reason") if event.type != POLICY_KEPT.name else None)
    fact("expires", when(data.get("expires_at")))
    fact("next_attempt", when(data.get("next_attempt")))
    fact("ip", data.get("ip"))
    fact("user_agent", data.get("user_agent"))
    fact("texts_sha256", data.get("texts_sha256") if event.type == CONSENT_GIVEN.name else None)
    if automated(event):
        reasons = data.get("automated_reasons", [])
        fact("why_automated", "; ".join(reason_said(text, catalog) for text in reasons))
    kind = {
        DOWNLOAD_FIRST.name: "download",
        DOWNLOAD_REPEAT.name: "download",
        DOWNLOAD_ZIP.name: "download",
        CONSENT_GIVEN.name: "consent",
        DELIVERY_BOUNCED.name: "bounce",
        LINK_REVOKED.name: "action",
        LINK_EXTENDED.name: "action",
        LETTER_RESENT.name: "action",
        LETTER_RELEASED_BY_AGENT.name: "action",
    }.get(event.type, "")
    return Line(event.seq, catalog.moment(event.at, seconds=True), label, kind, facts)


def recipient_views(story: MessageStory, catalog: Catalog) -> list[RecipientView]:
    views = []
    for told in story.recipients:
        view = RecipientView(told.address, told.state)
        releases = {
            e.delivery_id
            for e in told.events
            if e.type in (LETTER_RELEASED.name, LETTER_RELEASED_BY_AGENT.name) and e.delivery_id
        }
        delivered = {e.delivery_id for e in told.events if e.type == DELIVERY_DELIVERED.name}
        view.released_pending = bool(releases - delivered)
        for event in told.events:
            data = event.data
            letter_id = data.get("letter_id")
            if event.type == LETTER_HELD.name and isinstance(letter_id, str):
                view.letters.append(letter_id)
            if event.type == CONSENT_GIVEN.name and isinstance(letter_id, str):
                view.consents.append(letter_id)
            if event.type in (CONSENT_GIVEN.name, LETTER_RELEASED_BY_AGENT.name) and isinstance(
                letter_id, str
            ):
                view.released.append(letter_id)
            if event.type == LINK_CREATED.name and isinstance(data.get("link_id"), str):
                view.links.append(data["link_id"])
            if event.type in (LINK_CREATED.name, LETTER_HELD.name):
                view.has_links = True
            if event.type in QUIET:
                continue
            line = describe(event, catalog)
            if event.type == CONSENT_GIVEN.name and isinstance(letter_id, str):
                href = f"{MESSAGES}/{story.message.id}/letters/{letter_id}/consent.pdf"
                line = replace(line, download=(href, catalog.t("work.consent_pdf")))
            (view.scanner if automated(event) else view.lines).append(line)
        views.append(view)
    return views


def last_day(view: RecipientView, now: datetime) -> date:
    """The last day the extend form offers: links extended to a day are valid to its last
    minute, and the desk refuses one past the kind's maximum (a letter's is the shorter),
    counted in real time: across a clock change a day is not 24 hours of the wall clock."""
    kind = LinkKind.LETTER if view.letters else LinkKind.DOWNLOAD
    limit = (now.astimezone(UTC) + timedelta(days=MAX_DAYS[kind])).astimezone(now.tzinfo)
    return limit.date() if limit.time() >= VALID_UNTIL else limit.date() - timedelta(days=1)


def story_letters(story: MessageStory) -> dict[str, str]:
    """letter id -> recipient, for every letter this message made."""
    return {
        e.data["letter_id"]: r.address
        for r in story.recipients
        for e in r.events
        if e.type == LETTER_HELD.name and isinstance(e.data.get("letter_id"), str)
    }


def story_links(story: MessageStory) -> dict[str, str]:
    """download link id -> recipient."""
    return {
        e.data["link_id"]: r.address
        for r in story.recipients
        for e in r.events
        if e.type == LINK_CREATED.name and isinstance(e.data.get("link_id"), str)
    }


def parse_day(text: str) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


class TimelinePages:
    def __init__(self, view: ConsoleView, timeline: Timeline, waiting: WaitingLetters) -> None:
        self.view = view
        self.timeline = timeline
        self.waiting = waiting

    def register(self, routes: Routes) -> None:
        routes.console("GET", MESSAGES, self.messages, Permission.VIEW_MESSAGES)
        routes.console("GET", MESSAGES + "/{id}", self.message, Permission.VIEW_MESSAGES)
        routes.console("GET", LETTERS, self.letters, Permission.VIEW_MESSAGES)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        catalog = self.view.catalog(request)
        query = request.query
        text = query.get("q", "").strip()[:SEARCH_MAX]
        state_name = query.get("state", "")
        state = RecipientState(state_name) if state_name in set(RecipientState) else None
        since_day, until_day = parse_day(query.get("from", "")), parse_day(query.get("to", ""))
        zone = catalog.zone
        filters = MessageFilter(
            text=text or None,
            state=state,
            since=datetime.combine(since_day, time(), zone) if since_day else None,
            until=(
                datetime.combine(until_day + timedelta(days=1), time(), zone) if until_day else None
            ),
        )
        error = None
        bad_dates = (query.get("from") and not since_day) or (query.get("to") and not until_day)
        if bad_dates:
            error = catalog.t("work.bad_date")
        try:
            page = await self.timeline.messages(
                self.view.principal(request).scope, filters, query.get("after") or None, limit=50
            )
        except BadCursor:
            return self.view.render(
                request,
                "console/work_message.html",
                catalog.t("work.bad_cursor_title"),
                status=400,
                message=catalog.t("work.bad_cursor"),
            )
        kept: dict[str, Any] = {
            "q": text,
            "state": state.value if state else "",
            "from": since_day.isoformat() if since_day else "",
            "to": until_day.isoformat() if until_day else "",
        }
        older = None
        if page.next_cursor:
            older = f"{MESSAGES}?" + urlencode(
                {**{k: v for k, v in kept.items() if v}, "after": page.next_cursor}
            )
        return self.view.render(
            request,
            "console/messages.html",
            catalog.t("work.messages_title"),
            status=400 if bad_dates else 200,
            error=error,
            page=page,
            kept=kept,
            states=[(s.value, catalog.t(f"work.state.{s.value}")) for s in RecipientState],
            state_label=lambda s: catalog.t(f"work.state.{s}"),
            older=older,
            first_page=not query.get("after"),
        )

    async def message(self, request: web.Request) -> web.StreamResponse:
        story = await self.timeline.message(
            self.view.principal(request).scope, request.match_info["id"]
        )
        if story is None:
            return self.view.not_found(request)
        return self.render_story(request, story)

    def render_story(
        self,
        request: web.Request,
        story: MessageStory,
        *,
        error: str | None = None,
        status: int = 200,
    ) -> web.Response:
        catalog = self.view.catalog(request)
        general = [describe(e, catalog) for e in story.events if e.type not in QUIET]
        return self.view.render(
            request,
            "console/message_story.html",
            story.message.subject or catalog.t("work.no_subject"),
            status=status,
            error=error,
            story=story,
            general=general,
            recipients=recipient_views(story, catalog),
            state_label=lambda s: catalog.t(f"work.state.{s}"),
            today=datetime.now(catalog.zone).date().isoformat(),
            last_day=lambda view: last_day(view, datetime.now(catalog.zone)).isoformat(),
        )

    async def letters(self, request: web.Request) -> web.StreamResponse:
        catalog = self.view.catalog(request)
        letters = await self.waiting.listing(self.view.principal(request).scope)
        return self.view.render(
            request,
            "console/letters.html",
            catalog.t("work.letters_title"),
            letters=letters,
        )
