"""Outlook's winmail.dat reaches people outside the brokerage as the files it carries.

Outlook writes mail in Rich Text as a winmail.dat that only Outlook reads: a prospect on a
phone gets a file named winmail.dat instead of the offer's PDF. Colleagues (internal_recipient
decides first) keep what their Outlook reads, and so does a signed message, whose bytes must
not change (the gateway never unpacks one). Copies with links or a letter carry the files
already: this rule only decides for copies that would otherwise go out unchanged.
"""

from __future__ import annotations

from rules.actions import Action, UnpackWinmail
from rules.facts import MessageFacts
from rules.policy import Policy

name = "winmail"


def decide(facts: MessageFacts, recipient: str, policy: Policy) -> Action | None:
    if facts.winmail and policy.unpack_winmail:
        return UnpackWinmail()
    return None
