"""What a receiver gets: the body, its id, and the signatures (https://www.standardwebhooks.com/).

The body is `{"type", "timestamp", "data"}`; `data` holds the event's sequence number, the
message and mail copy it names, and its payload as the catalog (gateway/store/events.py)
declares it. A thin endpoint gets only the fields the catalog does not mark personal: ids,
times and counts, and fetches the rest through the API. The `webhook-id` is the event's own
(`evt_<seq>`), so a retry or a replay carries the same one and a receiver can drop
duplicates. Each active secret signs: during a rotation both, so a receiver holding either
one accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from gateway.store.events import CATALOG
from gateway.store.models import Event

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (the prefix, not a secret)
SECRET_BYTES: Final = 24


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key a secret stands for: its base64 part, decoded."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret is whsec_ and base64") from exc


def webhook_id(seq: int) -> str:
    """The id a receiver deduplicates on: the journal event's, the same on every attempt."""
    return f"evt_{seq}"


def signature(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256>` per secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(secret_key(s), signed, hashlib.sha256)).decode()
        for s in secrets_
    )


def headers(secrets_: Sequence[str], seq: int, now: datetime, body: bytes) -> dict[str, str]:
    msg_id = webhook_id(seq)
    timestamp = int(now.timestamp())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_, msg_id, timestamp, body),
    }


def thin_payload(event_type: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The payload without the fields its declaration marks personal."""
    declared = CATALOG.get(event_type)
    if declared is None:  # an event of a type no longer declared: nothing known to be safe
        return {}
    personal = {f.name for f in declared.fields() if f.personal}
    return {name: value for name, value in data.items() if name not in personal}


def body(event: Event, *, thin: bool) -> bytes:
    """The JSON body for `event`, compact and UTF-8."""
    payload = thin_payload(event.type, event.data) if thin else dict(event.data)
    document = {
        "type": event.type,
        "timestamp": iso(event.at),
        "data": {
            "seq": event.seq,
            "message_id": event.message_id,
            "delivery_id": event.delivery_id,
            "payload": payload,
        },
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
