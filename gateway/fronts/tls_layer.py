"""TLS put under an SMTP session that is already connected, with octets it already has.

After a PROXY header on an implicit-TLS listener the handshake begins at once, and the
client's ClientHello often comes in the same packet as the header: the session has read it
already. `loop.start_tls` takes no such octets, so the layer is made here and they are
handed to it before it reads the socket.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to finish a TLS handshake


async def secured(
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    early: bytes,
) -> asyncio.Transport:
    """The transport through the TLS layer once the handshake is done; the layer closes
    the socket and this raises (ssl.SSLError, OSError, TimeoutError) when it fails.
    `protocol.connection_made` is not called again."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    layer = sslproto.SSLProtocol(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        call_connection_made=False,
        ssl_handshake_timeout=int(HANDSHAKE_TIMEOUT),
    )
    transport.set_protocol(layer)
    layer.connection_made(transport)
    if early:
        _feed(layer, early)
    await waiter
    return layer._app_transport


def _feed(layer: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(layer.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        layer.buffer_updated(size)
        view = view[size:]
