"""Attachments over the limits, or of a kind always linked, become a personal download link.

One over `link_attachments_over` is linked; when all attachments together exceed
`link_total_over`, every one is. One whose MIME type or file name matches `always_link`
("video/*", "*.mp4") is linked whatever its size, and only it: the parts beside it follow the
limits. Types in `keep_attached` (calendar invitations, contact cards) always stay, so they
can be imported with one click.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from rules.actions import Action, LinkAttachments
from rules.facts import MessageFacts, PartFacts
from rules.language import language_of
from rules.policy import Policy

name = "large-attachments"


def always_linked(part: PartFacts, patterns: Iterable[str]) -> bool:
    """A pattern with a slash is a MIME type, any other a file name; both ignore case."""
    content_type = part.content_type.lower()
    filename = (part.filename or "").lower()
    return any(
        fnmatchcase(content_type if "/" in pattern else filename, pattern.lower())
        for pattern in patterns
    )


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    attachments = facts.attachments
    keep = {t.lower() for t in policy.keep_attached}
    linkable = [part for part in attachments if part.content_type.lower() not in keep]
    if sum(part.size for part in attachments) > policy.link_total_over:
        linked = linkable
    else:
        linked = [
            part
            for part in linkable
            if part.size > policy.link_attachments_over or always_linked(part, policy.always_link)
        ]
    if not linked:
        return None
    return LinkAttachments(
        tuple(part.id for part in linked),
        policy.download_link_days,
        language_of(facts, policy.language),
    )
