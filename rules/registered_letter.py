"""Offers go out as registered letters: consent first, then the original.

An offer is recognised by a tag at the start of its subject (`[Exposé] Villa am See`), by
the agent's `X-Sealrelay-Action: registered-letter`, or by a configured rule that sets
`registered_letter`. Large attachments of the held original are planned here too, so the
released copy is made like any other.
"""

from __future__ import annotations

from rules import large_attachments
from rules.actions import Action, LinkAttachments, RegisteredLetter
from rules.facts import MessageFacts
from rules.language import language_of
from rules.policy import Policy

name = "registered-letter"
ACTION_HEADER = "x-sealrelay-action"


def subject_tag(subject: str, tags: tuple[str, ...]) -> str | None:
    """The configured tag the subject starts with, matched without regard to case."""
    stripped = subject.lstrip().casefold()
    return next((tag for tag in tags if stripped.startswith(tag.casefold())), None)


def without_tag(subject: str, tags: tuple[str, ...]) -> str:
    """The subject as the prospect sees it: the tag only told the rules that it is an offer."""
    stripped = subject.lstrip()
    tag = subject_tag(stripped, tags)
    if tag is None or stripped[: len(tag)].casefold() != tag.casefold():
        return subject
    return stripped[len(tag) :].lstrip()


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    tag = subject_tag(facts.subject, policy.letter_tags)
    requested = (facts.header(ACTION_HEADER) or "").strip().lower() == "registered-letter"
    if tag is None and not requested and not policy.registered_letter:
        return None
    links = None if facts.signed else large_attachments.decide(facts, recipient, policy)
    return RegisteredLetter(
        language=language_of(facts, policy.language),
        link_days=policy.letter_link_days,
        block_set=policy.letter_block_set,
        tag=tag,
        link_parts=links.part_ids if isinstance(links, LinkAttachments) else (),
        download_days=policy.download_link_days,
    )
