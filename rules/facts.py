"""What policy may know about a message: plain values, gathered by the gateway."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MessageFacts:
    sender: str
    group: str | None
    recipients: tuple[str, ...]
    subject: str
    headers: tuple[tuple[str, str], ...]
