"""Letters waiting for consent, soonest expiry first: the console's "letters waiting" list.

A read over the letters the letter desk keeps, narrowed by the caller's `MessageScope` like
every other console read (gateway/console/timeline.py), so an agent sees only their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from gateway.access import MessageScope
from gateway.console.timeline import scope_clause
from gateway.store.db import Database
from gateway.store.models import Letter, LetterStatus, Link, Message


@dataclass(frozen=True)
class WaitingLetter:
    letter_id: str
    message_id: str
    recipient: str
    subject: str
    sent_at: datetime
    expires_at: datetime


class WaitingLetters:
    """Reads only."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def listing(self, scope: MessageScope, limit: int = 500) -> list[WaitingLetter]:
        """Every held letter in the scope whose link was not revoked (no one can consent to
        that one), the one whose link runs out first at the top."""
        query = (
            select(Letter, Link.expires_at)
            .join(Link, Link.id == Letter.link_id)
            .join(Message, Message.id == Letter.message_id)
            .where(Letter.status == LetterStatus.HELD, Link.revoked_at.is_(None))
            .order_by(Link.expires_at, Letter.id)
            .limit(limit)
        )
        narrowed = scope_clause(scope)
        if narrowed is not None:
            query = query.where(narrowed)
        async with self.db.snapshot() as session:
            rows = (await session.execute(query)).all()
        return [
            WaitingLetter(
                letter.id,
                letter.message_id,
                letter.recipient,
                letter.subject,
                letter.created_at,
                expires_at,
            )
            for letter, expires_at in rows
        ]
