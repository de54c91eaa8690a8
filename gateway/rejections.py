"""A refusal of a submitted message, with the SMTP reply every front gives for it.

Apart from the pipeline so that the checks the pipeline runs (gateway/letters/letter_keys.py)
and the fronts that answer with it (gateway/fronts/smtp.py) share one type without importing
each other.
"""

from __future__ import annotations


class Rejected(Exception):
    """A permanent or temporary refusal with the SMTP reply a front should give."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply
