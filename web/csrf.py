"""CSRF protection for the prospect's forms.

A form's token is HMAC-SHA256(secret key, sha256 of the link token), so it needs no storage
and no cookie: only a page that knew the link token can have it. The key is this
installation's `secret.key`, beside the blob store directory: 32 random bytes, created on
first use with mode 0600 (written to a temporary file and linked into place, so two processes
starting at once end up with the same key). A POST whose `Origin` header names another site
is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import Settings
from gateway.key_files import place_key
from gateway.links.tokens import hash_token

KEY_BYTES = 32
KEY_FILE = "secret.key"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def key_path(settings: Settings) -> Path:
    """This installation's secret key: beside the blob store directory."""
    return settings.storage.path.parent / KEY_FILE


def installation_key(settings: Settings) -> bytes:
    return load_or_create_key(key_path(settings))


def load_or_create_key(path: Path) -> bytes:
    """The key at `path`; created (32 random bytes, mode 0600) when there is none yet."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key(path)
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path}: a secret key must have at least {KEY_BYTES} bytes")
    return key


def _create_key(path: Path) -> bytes:
    return place_key(path, secrets.token_bytes(KEY_BYTES))


def origin_of(url: str) -> str:
    """scheme://host[:port] as a browser writes it in `Origin` (default ports left out)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class FormTokens:
    """Makes and checks the hidden `csrf` field of the forms behind one link token."""

    def __init__(self, key_path: Path, public_url: str) -> None:
        self.key_path = key_path
        self.origin = origin_of(public_url)
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_or_create_key(self.key_path)
        return self._key

    def token_for(self, link_token: str) -> str:
        digest = hash_token(link_token).encode("ascii")
        return hmac.new(self.key, digest, hashlib.sha256).hexdigest()

    def valid(self, link_token: str, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(
            self.token_for(link_token).encode("ascii"),
            presented.encode("utf-8", "replace"),
        )

    def origin_allowed(self, origin: str | None) -> bool:
        """No Origin header (older browsers, some clients) is fine; a foreign one is not."""
        return origin is None or origin_of(origin.strip()) == self.origin
