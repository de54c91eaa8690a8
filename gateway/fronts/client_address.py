"""Which address the SMTP client has: the one helper every check and record reads it from.

A session's `peer` is the TCP peer, or, on a listener behind HAProxy, the client that the
PROXY header named (the session puts it there). Trusted networks, the per-address
connection gate, the login throttle, Received lines, logs and the journal all ask here, so
none of them can see the proxy where the client is meant.
"""

from __future__ import annotations

from typing import Protocol


class HasPeer(Protocol):
    @property
    def peer(self) -> object: ...


def client_address(session: HasPeer) -> str:
    """The client's IP address as text ("" when the socket had none)."""
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
