"""What policy may know about a message: plain values, gathered by the gateway."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartFacts:
    """A leaf MIME part. `id` names it in the tree ("1", "2.1") for the materializer."""

    id: str
    content_type: str
    filename: str | None
    size: int
    is_attachment: bool


@dataclass(frozen=True)
class MessageFacts:
    sender: str
    group: str | None
    recipients: tuple[str, ...]
    subject: str
    headers: tuple[tuple[str, str], ...]
    parts: tuple[PartFacts, ...] = ()
    signed: bool = False
    # the parts include files a winmail.dat carried; the original holds the winmail.dat
    winmail: bool = False

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    @property
    def attachments(self) -> tuple[PartFacts, ...]:
        return tuple(part for part in self.parts if part.is_attachment)
