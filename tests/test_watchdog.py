"""gateway/watchdog.py: one timer for a run of waits, each with a deadline of its own."""

from __future__ import annotations

import asyncio
import gc
import weakref

from gateway.watchdog import Watchdog


async def watched() -> tuple[Watchdog, asyncio.Future[float]]:
    loop = asyncio.get_running_loop()
    fired: asyncio.Future[float] = loop.create_future()
    return Watchdog(loop, lambda: fired.set_result(loop.time())), fired


async def test_a_deadline_moved_on_is_waited_for_by_the_timer_already_set() -> None:
    watchdog, fired = await watched()
    loop = asyncio.get_running_loop()
    watchdog.due_in(0.5)
    first = watchdog.timer
    await asyncio.sleep(0.1)
    watchdog.due_in(0.5)
    later = loop.time() + 0.5
    assert watchdog.timer is first  # not set again: it fires first and sets itself anew
    assert await asyncio.wait_for(fired, 2) >= later - 0.002


async def test_an_earlier_deadline_sets_the_timer_again() -> None:
    watchdog, fired = await watched()
    loop = asyncio.get_running_loop()
    start = loop.time()
    watchdog.due_in(30)
    watchdog.due_in(0.02)
    assert await asyncio.wait_for(fired, 2) - start < 1


async def test_nothing_fires_while_resting_or_once_stopped() -> None:
    watchdog, fired = await watched()
    watchdog.due_in(0.02)
    watchdog.rest()
    for _ in range(200):  # until the timer has fired, and lapsed
        if watchdog.timer is None:
            break
        await asyncio.sleep(0.01)
    assert watchdog.timer is None and not fired.done()
    watchdog.due_in(0.02)
    watchdog.stop()
    await asyncio.sleep(0.05)
    assert not fired.done()
    watchdog.due_in(0.01)  # and it watches again afterwards
    await asyncio.wait_for(fired, 2)


async def test_a_timer_cancelled_from_outside_is_set_again() -> None:
    """aiosmtpd cancels the session's timer itself (SMTP.connection_lost)."""
    watchdog, fired = await watched()
    watchdog.due_in(30)
    assert watchdog.timer is not None
    watchdog.timer.cancel()
    watchdog.due_in(0.01)
    await asyncio.wait_for(fired, 2)


async def test_a_closed_watchdog_lets_go_of_its_owner() -> None:
    """The callback is usually the owner's method: closed, the owner is freed by reference
    counting, not left in a cycle for the garbage collector; a waiting watchdog (`waiting`)
    is one with a deadline."""

    fired: list[str] = []

    class Owner:
        def __init__(self) -> None:
            self.watchdog = Watchdog(asyncio.get_running_loop(), self.expired)

        def expired(self) -> None:
            fired.append("expired")

    gc.collect()
    gc.disable()
    try:
        owner = Owner()
        owner.watchdog.due_in(0.01)
        assert owner.watchdog.waiting
        owner.watchdog.close()
        assert not owner.watchdog.waiting and owner.watchdog.timer is None
        gone = weakref.ref(owner)
        del owner
        assert gone() is None
    finally:
        gc.enable()
    await asyncio.sleep(0.05)  # past the old deadline: nothing fires
    assert fired == []
