"""The bytes that leave: a stored copy plus trace fields, then the DKIM signature.

Signing comes last, after every change to the copy, so the signature covers what is sent.
Fields are only ever prepended; the agent's own header bytes are never rewritten.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from gateway.mail import dkim, headers
from gateway.mail.evidence_headers import OVERSIGNED_HEADERS
from gateway.mail.loop_mark import LOOP_HEADER, LoopMarks
from gateway.store.models import Message
from rules.domains import domain_key, domain_of

_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:@_+-]")  # no parentheses, no backslash, ASCII


class Signer:
    """DKIM keys by the From domain, loaded once at start-up."""

    def __init__(self, keys: Mapping[str, dkim.DkimKey]) -> None:
        self.keys = {domain_key(domain): key for domain, key in keys.items()}

    def key_for(self, author_domain: str) -> dkim.DkimKey | None:
        """The key of a From domain in either form, `bücher.example` or its A-labels."""
        return self.keys.get(domain_key(author_domain))


def prepare(
    raw: bytes,
    message: Message,
    hostname: str,
    signer: Signer,
    loop: LoopMarks | None = None,
    *,
    now: int | None = None,
) -> bytes:
    """`raw` with the trace fields, the loop mark and the DKIM signature in front, built in
    one join.

    Each intermediate copy of a 10 MB message would be 10 MB more memory: the signature is
    made over the new header block alone, with the body hash computed from `raw` in place.
    A big stored copy is not read whole at all (gateway/outbound/stored_copy.py). `now`:
    the signature's t=, when not the present second.
    """
    header_end, body_start = headers.split_offsets(raw)
    head = Head.of(raw[:header_end], message, hostname, signer, loop)
    bh = dkim.body_hash(raw, body_start) if head.key is not None else None
    return headers.prepend(raw, [head.fields(bh, now=now)])


@dataclass(frozen=True)
class Head:
    """What goes in front of a stored copy, but for the body hash: the fields added (trace
    field, loop mark, a Message-ID and Date the agent left out), the copy's own header block
    they are signed with, and the key that signs, if the From domain has one.

    The loop mark is signed and oversigned: a DKIM verifier sees that our domain put it
    there, and a second mark added later breaks the signature.
    """

    added: tuple[bytes, ...]
    header_block: bytes
    key: dkim.DkimKey | None

    @classmethod
    def of(
        cls,
        header_block: bytes,
        message: Message,
        hostname: str,
        signer: Signer,
        loop: LoopMarks | None = None,
    ) -> Head:
        fields = headers.parse_fields(header_block)
        added = [received_field(message, hostname)]
        if loop is not None:
            added.append(loop.field(message))
        if headers.first_value(fields, "message-id") is None:
            added.append(headers.format_field("Message-ID", message.message_id_header))
        if headers.first_value(fields, "date") is None:
            added.append(headers.format_field("Date", received_date(message)))
        domain = author_domain(fields)
        key = signer.key_for(domain) if domain is not None else None
        return cls(tuple(added), header_block, key)

    def fields(self, bh: str | None, *, now: int | None = None) -> bytes:
        """The bytes to put in front of the copy: the signature over the body hash `bh`
        (body_hash() or BodyHash) first, when there is a key, then the added fields."""
        if self.key is None:
            return b"".join(self.added)
        if bh is None:
            raise ValueError("a signed copy needs its body hash")
        signature = dkim.sign(
            self.header_block,
            self.key,
            bh=bh,
            extra_oversigned=(*OVERSIGNED_HEADERS, LOOP_HEADER),
            now=now,
            added=self.added,
        )
        return b"".join((signature, *self.added))


def author_domain(fields: list[headers.HeaderField]) -> str | None:
    """The domain of the first From address by its key (rules/domains.py), as `[dkim]` names
    it: the one whose key signs (Signer.key_for)."""
    authors = headers.addresses(fields, "from")
    return domain_of(authors[0]) if authors else None


_OUR_ID = re.compile(rb"\(sealrelay\)\s+with\s+[A-Z]+\s+id\s+([0-9a-f]+);")


def relay_id(data: bytes) -> str | None:
    """The message id our own trace field carries in an outgoing copy (see received_field)."""
    end = data.find(b"\r\n\r\n")  # the header block alone: the body may be 50 MB
    for field in headers.parse_fields(data if end == -1 else data[: end + 2]):
        if field.name == "received":
            found = _OUR_ID.search(field.raw)
            return found.group(1).decode() if found else None
    return None


def received_date(message: Message) -> str:
    """When `message` came, as RFC 5322 writes dates, which show no fraction of a second."""
    return _date_of_second(message.received_at.replace(microsecond=0))


@functools.lru_cache(maxsize=64)
def _date_of_second(moment: datetime) -> str:
    """Kept: every copy of every message received in the same second shares it."""
    return format_datetime(moment)


def received_field(message: Message, hostname: str) -> bytes:
    helo = _HELO_UNSAFE.sub("", message.helo) or "unknown"
    source = f"from {helo} ({message.peer}) " if message.peer else ""
    if message.trusted_client:
        source += f"(trusted client {_COMMENT_UNSAFE.sub('', message.trusted_client)}) "
    return headers.format_field(
        "Received",
        f"{source}by {hostname} (sealrelay) with {message.protocol} id {message.id};"
        f" {received_date(message)}",
    )
