"""The loop-prevention mark: a signed `X-Sealrelay-Loop` field on every copy that leaves.

A smart-host setup (Microsoft 365, Google Workspace) sends agents' mail to us and takes
our copies back to deliver them. When its routing rule is wrong, our copy comes back to us
and would go round until a hop limit stops it. The mark lets us recognise our own copy at
intake and refuse it at once (554 5.4.6); the platform's rule can skip mail that carries it.

The mac binds the relay's hostname, the time, our message id and the Message-ID header,
so a mark copied onto another message does not verify. The key is a relay secret kept in a
file, never in the database; the relays of one brokerage share it (docs/microsoft-365.md).
A mark that does not verify is not ours: it is no loop, and it is removed from the copies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from gateway.key_files import place_key
from gateway.mail import headers
from gateway.mail.headers import HeaderField
from gateway.store.models import Message, utcnow

LOOP_HEADER = "X-Sealrelay-Loop"
VERSION = "1"
KEY_BYTES = 32
# A relay's hostname and our ids are short; anything longer in a mark is not ours.
_TAG = re.compile(r"\s*([a-z]+)\s*=\s*([^;\s]*)\s*")
_HOSTNAME = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class LoopKeyError(ValueError):
    """The key file cannot be read or created; the message names the file and the key."""


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, made (32 random bytes, base64, mode 0600) when there is none.

    Made as every key file is (gateway/key_files.py): two relays starting at once on a
    shared directory end up with the same key.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        place_key(path, base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
    except OSError as exc:
        raise LoopKeyError(f"loop.key_file {path}: cannot create it: {exc.strerror}") from exc
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise LoopKeyError(f"loop.key_file {path}: cannot read it: {exc}") from exc
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) < KEY_BYTES:
        raise LoopKeyError(
            f"loop.key_file {path}: not a loop key (expected at least {KEY_BYTES} random bytes"
            " in base64 on one line); delete it to have a new one made"
        )
    return key


@dataclass(frozen=True)
class Mark:
    """A mark as found in a message: its tags, whatever they say."""

    relay: str
    time: int | None
    relay_id: str
    mac: str
    version: str

    @classmethod
    def parse(cls, value: str) -> Mark | None:
        tags: dict[str, str] = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            found = _TAG.fullmatch(part)
            if found is None:
                return None
            tags.setdefault(found.group(1), found.group(2))
        try:
            moment = int(tags.get("t", ""))
        except ValueError:
            moment = None
        return cls(
            relay=tags.get("h", "")[:253],
            time=moment,
            relay_id=tags.get("id", "")[:64],
            mac=tags.get("mac", ""),
            version=tags.get("v", ""),
        )


@dataclass(frozen=True)
class Finding:
    """What a mark in an incoming message turned out to be.

    `verdict` is "loop" (ours, recent), "expired" (ours, older than the window) or
    "forged" (no valid mac for our key: altered, moved, made with another key, malformed).
    """

    verdict: str
    relay: str
    reason: str


class LoopMarks:
    """Makes the mark for a copy and judges marks in incoming mail, with one key."""

    def __init__(
        self,
        key: bytes,
        hostname: str,
        max_age: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"a loop key has at least {KEY_BYTES} bytes")
        self._key = key
        self.hostname = hostname
        self.max_age = max_age
        self.clock = clock

    def field(self, message: Message) -> bytes:
        """The `X-Sealrelay-Loop` field for an outgoing copy of `message`, made now."""
        moment = int(self.clock().timestamp())
        mac = self._mac(self.hostname, moment, message.id, message.message_id_header)
        return headers.format_field(
            LOOP_HEADER,
            f"v={VERSION}; h={self.hostname}; t={moment}; id={message.id}; mac={mac}",
        )

    def judge(self, fields: Iterable[HeaderField]) -> list[Finding]:
        """One finding per mark in the header block, in order."""
        fields = list(fields)
        message_id = headers.first_value(fields, "message-id") or ""
        now = int(self.clock().timestamp())
        return [
            self._judge(field.value, message_id, now)
            for field in fields
            if field.name == LOOP_HEADER.lower()
        ]

    def _judge(self, value: str, message_id: str, now: int) -> Finding:
        mark = Mark.parse(value)
        if mark is None:
            return Finding("forged", "", "the field is not a list of tag=value pairs")
        relay = mark.relay if _HOSTNAME.fullmatch(mark.relay) else ""
        if mark.version != VERSION:
            return Finding("forged", relay, f"unknown version v={mark.version[:10]!r}")
        if not relay or mark.time is None or not _ID.fullmatch(mark.relay_id) or not mark.mac:
            return Finding("forged", relay, "a tag (h, t, id or mac) is missing or malformed")
        expected = self._mac(relay, mark.time, mark.relay_id, message_id)
        if not hmac.compare_digest(expected.encode(), mark.mac.encode()):
            return Finding(
                "forged", relay, "the mac does not verify (altered, moved, or another key)"
            )
        if now - mark.time > self.max_age.total_seconds():
            return Finding("expired", relay, f"made {(now - mark.time) // 86400} days ago")
        return Finding("loop", relay, f"our copy {mark.relay_id} came back")

    def _mac(self, relay: str, moment: int, relay_id: str, message_id: str) -> str:
        signed = "\n".join(
            (
                f"v={VERSION}",
                f"h={relay.lower()}",
                f"t={moment}",
                f"id={relay_id}",
                _bare(message_id),
            )
        )
        digest = hmac.new(self._key, signed.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()


def _bare(message_id: str) -> str:
    """The Message-ID without white space, which folding may add or move."""
    return "msgid=" + "".join(message_id.split())
