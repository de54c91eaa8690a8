"""What an agent does to a message from its page: revoke a recipient's links, extend them,
re-send or release a held letter, preview what the recipient sees, and download the consent
PDF and the released original for a lawyer.

Every action first reads the message with the caller's scope: a message outside it is a 404,
and a letter or link id must belong to that message, so no id of someone else's message can
be acted on through one of one's own. The desks check state and write in one transaction;
a refusal (`ActionRefused`) has written nothing and is shown on the message page.
"""

from __future__ import annotations

import logging
from datetime import date, datetime

from aiohttp import web

from gateway.access import Permission
from gateway.agent_actions import ActionRefused, InvalidRequest, UnknownTarget, WrongState
from gateway.console.timeline import MessageStory, Timeline
from gateway.letters.blocks import markdown_html
from gateway.letters.desk import LetterDesk
from gateway.links.desk import LinkDesk
from gateway.texts.catalog import Catalog
from web.console.paths import MESSAGES
from web.console.timeline import (
    VALID_UNTIL,
    TimelinePages,
    story_letters,
    story_links,
)
from web.console.view import ConsoleView, form_text
from web.guard import Routes
from web.pages import content_disposition

log = logging.getLogger(__name__)

MESSAGE = MESSAGES + "/{id}"
LETTER = MESSAGE + "/letters/{letter}"
LINK = MESSAGE + "/links/{link}"


class NotInMessage(Exception):
    """The message is out of scope, or the recipient, letter or link is not one of its."""


class ActionPages:
    def __init__(
        self,
        view: ConsoleView,
        timeline: Timeline,
        pages: TimelinePages,
        links: LinkDesk,
        letters: LetterDesk,
    ) -> None:
        self.view = view
        self.timeline = timeline
        self.pages = pages
        self.links = links
        self.letters = letters

    def register(self, routes: Routes) -> None:
        act, see = Permission.ACT_ON_MESSAGES, Permission.VIEW_MESSAGES
        routes.console("POST", MESSAGE + "/revoke", self.revoke, act)
        routes.console("POST", MESSAGE + "/extend", self.extend, act)
        routes.console("POST", LETTER + "/resend", self.resend, act)
        routes.console("POST", LETTER + "/release", self.release, act)
        routes.console("GET", LETTER + "/preview", self.preview_letter, see)
        routes.console("GET", LINK + "/preview", self.preview_link, see)
        routes.console("GET", LETTER + "/consent.pdf", self.consent_pdf, see)
        routes.console("GET", LETTER + "/original.eml", self.original, see)

    # -- the message, and what of it a request names

    async def _story(self, request: web.Request) -> MessageStory:
        story = await self.timeline.message(
            self.view.principal(request).scope, request.match_info["id"]
        )
        if story is None:
            raise NotInMessage()
        return story

    @staticmethod
    def _recipient(story: MessageStory, form: dict[str, str]) -> str:
        wanted = form.get("recipient", "").lower()
        for told in story.recipients:
            if told.address.lower() == wanted:
                return told.address
        raise NotInMessage()

    @staticmethod
    def _letter(story: MessageStory, request: web.Request) -> str:
        letter_id = request.match_info["letter"]
        if letter_id not in story_letters(story):
            raise NotInMessage()
        return letter_id

    async def _form(self, request: web.Request) -> dict[str, str]:
        posted = await request.post()
        return {k: form_text(v) for k, v in posted.items()}

    def _back(self, story: MessageStory) -> str:
        return f"{MESSAGES}/{story.message.id}"

    def _refused(
        self, request: web.Request, story: MessageStory, exc: ActionRefused
    ) -> web.Response:
        catalog = self.view.catalog(request)
        key, status = {
            UnknownTarget: ("work.error.unknown", 409),
            WrongState: ("work.error.wrong_state", 409),
            InvalidRequest: ("work.error.invalid", 400),
        }.get(type(exc), ("work.error.wrong_state", 409))
        log.info("console action on %s refused: %s", story.message.id, exc)
        return self.pages.render_story(
            request,
            story,
            error=catalog.t(key, detail=exc.said(catalog)),
            status=status,
        )

    # -- actions

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        try:
            story = await self._story(request)
            form = await self._form(request)
            recipient = self._recipient(story, form)
        except NotInMessage:
            return self.view.not_found(request)
        try:
            ended = await self.links.revoke(
                story.message.id,
                recipient,
                self.view.principal(request).name,
                form.get("reason", ""),
            )
        except ActionRefused as exc:
            return self._refused(request, story, exc)
        raise self.view.see_other(self._back(story), "revoked" if ended else "revoked_none")

    async def extend(self, request: web.Request) -> web.StreamResponse:
        try:
            story = await self._story(request)
            form = await self._form(request)
            recipient = self._recipient(story, form)
        except NotInMessage:
            return self.view.not_found(request)
        catalog = self.view.catalog(request)
        try:
            until = _end_of_day(form.get("until", ""), catalog)
            await self.links.extend(
                (story.message.id, recipient), until, self.view.principal(request).name
            )
        except ActionRefused as exc:
            return self._refused(request, story, exc)
        raise self.view.see_other(self._back(story), "extended")

    async def resend(self, request: web.Request) -> web.StreamResponse:
        try:
            story = await self._story(request)
            letter_id = self._letter(story, request)
        except NotInMessage:
            return self.view.not_found(request)
        try:
            await self.letters.resend(letter_id, self.view.principal(request).name)
        except ActionRefused as exc:
            return self._refused(request, story, exc)
        raise self.view.see_other(self._back(story), "resent")

    async def release(self, request: web.Request) -> web.StreamResponse:
        try:
            story = await self._story(request)
            letter_id = self._letter(story, request)
            form = await self._form(request)
        except NotInMessage:
            return self.view.not_found(request)
        try:
            await self.letters.release_by_agent(
                letter_id, self.view.principal(request).name, form.get("reason", "")
            )
        except ActionRefused as exc:
            return self._refused(request, story, exc)
        raise self.view.see_other(self._back(story), "released")

    # -- reading: previews and documents

    async def preview_letter(self, request: web.Request) -> web.StreamResponse:
        """The letter's texts as the recipient's page shows them; records nothing, and the
        page has no form: the boxes are drawn disabled and nothing posts to /l/."""
        try:
            story = await self._story(request)
            letter_id = self._letter(story, request)
        except NotInMessage:
            return self.view.not_found(request)
        preview = await self.letters.preview(letter_id, self.view.principal(request).name)
        catalog = self.view.catalog(request)
        found = preview.found
        return self.view.render(
            request,
            "console/preview.html",
            catalog.t("work.preview_title"),
            story=story,
            recipient=found.letter.recipient,
            subject=found.letter.subject,
            blocks=[
                {
                    "id": b.id,
                    "title": b.title,
                    "html": markdown_html(b.text),
                    "checkbox": b.checkbox,
                }
                for b in found.blocks
            ],
            button=found.letter.button,
            files=None,
            closed=catalog.t(f"work.closed.{preview.closed.value}") if preview.closed else None,
            expires=found.link.expires_at,
        )

    async def preview_link(self, request: web.Request) -> web.StreamResponse:
        try:
            story = await self._story(request)
            link_id = request.match_info["link"]
            if link_id not in story_links(story):
                raise NotInMessage()
        except NotInMessage:
            return self.view.not_found(request)
        found = await self.links.preview(link_id, self.view.principal(request).name)
        catalog = self.view.catalog(request)
        state = found.state.value
        return self.view.render(
            request,
            "console/preview.html",
            catalog.t("work.preview_title"),
            story=story,
            recipient=found.link.recipient,
            subject=found.message.subject,
            blocks=(),
            button=None,
            files=found.files,
            closed=catalog.t(f"work.closed.{state}") if state != "valid" else None,
            expires=found.link.expires_at,
        )

    async def consent_pdf(self, request: web.Request) -> web.StreamResponse:
        return await self._document(request, "consent")

    async def original(self, request: web.Request) -> web.StreamResponse:
        return await self._document(request, "original")

    async def _document(self, request: web.Request, which: str) -> web.StreamResponse:
        try:
            story = await self._story(request)
            letter_id = self._letter(story, request)
        except NotInMessage:
            return self.view.not_found(request)
        try:
            if which == "consent":
                body = await self.letters.consent_pdf(letter_id, self.view.principal(request).name)
                name, kind = f"consent-{letter_id}.pdf", "application/pdf"
            else:
                original = await self.letters.released_original(
                    letter_id, self.view.principal(request).name
                )
                body = original.data
                unsigned = "" if original.signed else "-unsigned"
                name, kind = f"original-{letter_id}{unsigned}.eml", "message/rfc822"
        except ActionRefused as exc:
            return self._refused(request, story, exc)
        return web.Response(
            body=body,
            content_type=kind,
            headers={"Content-Disposition": content_disposition(name)},
        )


def _end_of_day(text: str, catalog: Catalog) -> datetime:
    """The last minute of a calendar day in the branding zone: what "valid until" means."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest("action.expiry_not_a_date") from None
    return datetime.combine(day, VALID_UNTIL, catalog.zone)
