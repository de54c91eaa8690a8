"""The wake-up call between whoever commits deliveries and the workers that send them.

Apart from the pipeline, as the workers (gateway/outbound/delivery.py) and every writer of the
relay's own mail share it without depending on how a submission is handled.
"""

from __future__ import annotations

import asyncio
import contextlib


class QueueSignal:
    """Wakes local delivery workers when new work is committed, instead of waiting a poll."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()
