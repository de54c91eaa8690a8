"""The header fields that carry a registered letter's evidence in its released original.

Every signature the relay makes oversigns them (gateway/mail/outgoing.py), so nobody can add
one to a signed copy later; the letters package writes and reads their values.
"""

from __future__ import annotations

CONSENT_HEADER = "X-Sealrelay-Consent"
LETTER_SENT_HEADER = "X-Sealrelay-Letter-Sent"
EVIDENCE_HEADERS = (CONSENT_HEADER, LETTER_SENT_HEADER)
# On an offer an agent released without consent: who and when, so no reader takes it for consent.
RELEASED_BY_AGENT_HEADER = "X-Sealrelay-Released-By-Agent"
# What every signature of ours oversigns: none of these can be added to a signed copy later.
OVERSIGNED_HEADERS = (*EVIDENCE_HEADERS, RELEASED_BY_AGENT_HEADER)
