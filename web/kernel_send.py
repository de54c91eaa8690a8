"""A byte range of a local file onto a plain TCP connection by the kernel (sendfile), so the
bytes never pass through Python.

asyncio's loop does it itself (`loop.sendfile`, as aiohttp's FileResponse uses); uvloop does
not implement it, so there the socket's own descriptor is fed with `os.sendfile`, waiting for
it to become writable on a duplicate of it: the transport owns the original, and the
duplicate keeps the socket alive however the connection ends while we send. Either way the
response's headers are on the wire first, and a TLS connection is never sent to (the kernel
would bypass the encryption): the caller streams then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import IO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter


async def kernel_send(request: web.Request, file: IO[bytes], start: int, length: int) -> bool:
    """Whether the kernel sent `length` bytes of `file` from `start` after the prepared
    response's headers; False, with nothing sent, when this connection cannot."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    if transport.get_extra_info("sslcontext") is not None:
        return False
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, file, start, length, fallback=False)
    except (NotImplementedError, asyncio.SendfileNotAvailableError):
        pass  # uvloop, or an unusual transport: try the socket itself
    except RuntimeError:
        return False  # a transport asyncio cannot sendfile to, nothing sent
    else:
        return True
    socket = transport.get_extra_info("socket")
    if socket is None or not hasattr(socket, "fileno"):
        return False
    await _flushed(transport, request.writer)
    await _send_on_socket(loop, socket.fileno(), file.fileno(), start, length)
    return True


async def _flushed(transport: asyncio.Transport, writer: AbstractStreamWriter) -> None:
    """Wait until the transport has written everything it holds (the headers): uvloop queues
    writes until the end of the loop's iteration. Limits of zero have the transport pause the
    protocol until its buffer is empty, and aiohttp's drain waits for that."""
    if transport.get_write_buffer_size() == 0:
        return
    high, low = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        await writer.drain()
    finally:
        transport.set_write_buffer_limits(high=high, low=low)
    if transport.get_write_buffer_size():
        raise ConnectionResetError("connection lost before the headers were sent")


async def _send_on_socket(
    loop: asyncio.AbstractEventLoop, socket_fd: int, file_fd: int, start: int, length: int
) -> None:
    """os.sendfile onto a non-blocking socket, waiting for it to take more in between."""
    fd = os.dup(socket_fd)
    try:
        position, end = start, start + length
        while position < end:
            try:
                sent = os.sendfile(fd, file_fd, position, end - position)
            except BlockingIOError:
                await _writable(loop, fd)
                continue
            if sent == 0:
                raise OSError(f"file ended {end - position} bytes early")
            position += sent
    finally:
        os.close(fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        # before the duplicate is closed: epoll would keep watching it while the original lives
        with contextlib.suppress(OSError, ValueError):
            loop.remove_writer(fd)
