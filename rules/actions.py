"""What can happen to a recipient's copy. One small frozen dataclass per kind of action;
the gateway has one materializer per type."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeepOriginal:
    """The recipient gets the message as the agent wrote it."""


Action = KeepOriginal
