"""Attachments over the limits become a personal download link.

One over `link_attachments_over` is linked; when all attachments together exceed
`link_total_over`, every one is. Types in `keep_attached` (calendar invitations, contact
cards) always stay, so they can be imported with one click.
"""

from __future__ import annotations

from rules.actions import Action, LinkAttachments
from rules.facts import MessageFacts
from rules.language import language_of
from rules.policy import Policy

name = "large-attachments"


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    attachments = facts.attachments
    keep = {t.lower() for t in policy.keep_attached}
    linkable = [part for part in attachments if part.content_type.lower() not in keep]
    if sum(part.size for part in attachments) > policy.link_total_over:
        linked = linkable
    else:
        linked = [part for part in linkable if part.size > policy.link_attachments_over]
    if not linked:
        return None
    return LinkAttachments(
        tuple(part.id for part in linked), policy.download_link_days, language_of(facts, policy)
    )
