"""What can happen to a recipient's copy. One small frozen dataclass per kind of action;
the gateway has one materializer per type, so a new kind touches no other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeepOriginal:
    """The recipient gets the message as the agent wrote it; `reason` says why, if notable."""

    reason: str = ""


@dataclass(frozen=True)
class LinkAttachments:
    """These parts leave the copy; a personal download link in `language` replaces them."""

    part_ids: tuple[str, ...]
    days: int
    language: str


@dataclass(frozen=True)
class RegisteredLetter:
    """The original is held; the recipient first gets a letter with the consent texts.

    On consent the held original is released with `link_parts` turned into a download link,
    as any other copy would be, and `tag` taken off its subject.
    """

    language: str
    link_days: int
    block_set: str
    tag: str | None
    link_parts: tuple[str, ...]
    download_days: int  # for `link_parts`; the policy's download_link_days


@dataclass(frozen=True)
class UnpackWinmail:
    """The recipient gets the message with each winmail.dat replaced by the files it carries;
    nothing else changes."""


Action = KeepOriginal | LinkAttachments | RegisteredLetter | UnpackWinmail
