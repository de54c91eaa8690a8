"""What agents do through the API: end or extend a recipient's links, re-send or release a
letter, and fetch a letter's evidence for a lawyer.

Links are named as the message detail names recipients (`/messages/{id}/recipients/
{recipient}/...`): an agent acts on "what Ms X got from this message", and the desk ends or
extends all of that recipient's links together, the letter's link included, so no link is
left open by mistake. Letters have their own ids (`letters` in the message detail), as a
recipient may be sent several.

Before any action, the one scope check (`Timeline.in_scope`) asks whether the message (or the
letter's message) lies in the caller's scope; outside it the answer is the same 404 as for an
unknown id. The desks' refusals become problems in one place (`_refusals`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.access import Permission
from gateway.agent_actions import InvalidRequest, UnknownTarget, WrongState
from gateway.console.timeline import Target, Timeline
from gateway.letters.desk import LetterDesk
from gateway.links.desk import LinkDesk
from web.api import models as m
from web.api.declare import Binary, Call, File, NoBody, NoQuery, Operation
from web.problem_details import ProblemResponse


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except UnknownTarget as exc:
        raise ProblemResponse.refused(404, exc) from exc
    except WrongState as exc:
        raise ProblemResponse.refused(409, exc) from exc
    except InvalidRequest as exc:
        raise ProblemResponse.refused(422, exc) from exc


@dataclass(frozen=True)
class MessageActions:
    timeline: Timeline
    links: LinkDesk
    letters: LetterDesk

    async def _reach(self, call: Call[Any, Any], target: Target) -> str:
        """The target's id from the path, once it is known to lie in the caller's scope."""
        target_id = call.path["id"]
        if not await self.timeline.in_scope(call.principal.scope, target, target_id):
            raise ProblemResponse(404, f"No such {target}.")
        return target_id

    async def revoke_links(self, call: Call[NoQuery, m.RevokeLinks]) -> m.LinksChanged:
        message_id = await self._reach(call, Target.MESSAGE)
        with _refusals():
            ended = await self.links.revoke(
                message_id, call.path["recipient"], call.principal.name, call.body.reason
            )
        return m.LinksChanged(link_ids=ended)

    async def extend_links(self, call: Call[NoQuery, m.ExtendLinks]) -> m.LinksChanged:
        message_id = await self._reach(call, Target.MESSAGE)
        with _refusals():
            changed = await self.links.extend(
                (message_id, call.path["recipient"]), call.body.until, call.principal.name
            )
        return m.LinksChanged(link_ids=changed)

    async def resend_letter(self, call: Call[NoQuery, NoBody]) -> m.LetterQueued:
        letter_id = await self._reach(call, Target.LETTER)
        with _refusals():
            delivery = await self.letters.resend(letter_id, call.principal.name)
        return m.LetterQueued(letter_id=letter_id, delivery_id=delivery.id)

    async def release_letter(self, call: Call[NoQuery, m.ReleaseLetter]) -> m.LetterQueued:
        letter_id = await self._reach(call, Target.LETTER)
        with _refusals():
            delivery = await self.letters.release_by_agent(
                letter_id, call.principal.name, call.body.reason
            )
        return m.LetterQueued(letter_id=letter_id, delivery_id=delivery.id)

    async def consent_pdf(self, call: Call[NoQuery, NoBody]) -> File:
        letter_id = await self._reach(call, Target.LETTER)
        with _refusals():
            pdf = await self.letters.consent_pdf(letter_id, call.principal.name)
        return File(pdf, f"consent-{letter_id}.pdf")

    async def released_original(self, call: Call[NoQuery, NoBody]) -> File:
        letter_id = await self._reach(call, Target.LETTER)
        with _refusals():
            original = await self.letters.released_original(letter_id, call.principal.name)
        unsigned = "" if original.signed else "-unsigned"
        return File(original.data, f"released-{letter_id}{unsigned}.eml")

    def operations(self, prefix: str) -> list[Operation[Any, Any]]:
        read, act = Permission.VIEW_MESSAGES, Permission.ACT_ON_MESSAGES
        recipient = f"{prefix}/messages/{{id}}/recipients/{{recipient}}"
        letter = f"{prefix}/letters/{{id}}"
        return [
            Operation("POST", f"{recipient}/revoke", act,
                      "End every link a message made for a recipient (the letter's too), now",
                      self.revoke_links, NoQuery, m.RevokeLinks, m.LinksChanged,
                      errors=(404,)),
            Operation("POST", f"{recipient}/extend", act,
                      "Give a recipient's links a new expiry (an expired one opens again)",
                      self.extend_links, NoQuery, m.ExtendLinks, m.LinksChanged,
                      errors=(404, 409)),
            Operation("POST", f"{letter}/resend", act,
                      "Send a held or expired letter again with a fresh link; the old one ends",
                      self.resend_letter, NoQuery, NoBody, m.LetterQueued, 202,
                      errors=(404, 409)),
            Operation("POST", f"{letter}/release", act,
                      "Release a held offer without consent, with a reason (journaled as the"
                      " agent's act, not as consent)",
                      self.release_letter, NoQuery, m.ReleaseLetter, m.LetterQueued, 202,
                      errors=(404, 409)),
            Operation("GET", f"{letter}/consent.pdf", read,
                      "The PDF of the recipient's declarations",
                      self.consent_pdf, NoQuery, NoBody,
                      Binary("application/pdf", "The consent record as PDF."),
                      errors=(404, 409)),
            Operation("GET", f"{letter}/original.eml", read,
                      "The released original with its evidence headers, as queued",
                      self.released_original, NoQuery, NoBody,
                      Binary("message/rfc822", "The released message (.eml)."),
                      errors=(404, 409)),
        ]  # fmt: skip
