"""Setting an asyncio event of one loop from anywhere: a driver's thread, another loop.

`Event.set` is only safe in its own loop; elsewhere it must go through that loop's queue."""

from __future__ import annotations

import asyncio


def set_in(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Set `event`, an event of `loop`: at once in `loop`, else through its queue; nothing
    once `loop` is closed."""
    if loop.is_closed():
        return
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        event.set()
    else:
        loop.call_soon_threadsafe(event.set)
