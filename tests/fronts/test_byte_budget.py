"""The front's budget of received octets in memory at once (gateway/fronts/byte_budget.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.fronts.byte_budget import ByteBudget
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay

MIB = 1024 * 1024


async def hold(budget: ByteBudget, size: int, entered: list[int], leave: asyncio.Event) -> None:
    async with budget.holding(size):
        entered.append(size)
        await leave.wait()


async def settled() -> None:
    """Let every task run as far as it can (the budget hands over with no I/O)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_holds_what_fits_and_lets_the_next_in_when_room_is_made() -> None:
    budget = ByteBudget(10 * MIB)
    entered: list[int] = []
    leave = [asyncio.Event() for _ in range(3)]
    tasks = [
        asyncio.create_task(hold(budget, size, entered, event))
        for size, event in zip((6 * MIB, 5 * MIB, 4 * MIB), leave, strict=True)
    ]
    await settled()
    assert entered == [6 * MIB, 4 * MIB]  # 5 MiB does not fit; 4 MiB, behind it, does
    assert budget.held == 10 * MIB
    leave[0].set()
    await settled()
    assert entered == [6 * MIB, 4 * MIB, 5 * MIB] and budget.held == 9 * MIB
    for event in leave:
        event.set()
    await asyncio.gather(*tasks)
    assert budget.held == 0


async def test_a_message_larger_than_the_budget_goes_alone() -> None:
    budget = ByteBudget(MIB)
    entered: list[int] = []
    small_leaves, big_leaves = asyncio.Event(), asyncio.Event()
    small = asyncio.create_task(hold(budget, 1000, entered, small_leaves))
    await settled()
    big = asyncio.create_task(hold(budget, 3 * MIB, entered, big_leaves))
    await settled()
    assert entered == [1000]
    small_leaves.set()
    await settled()
    assert entered == [1000, 3 * MIB] and budget.held == 3 * MIB
    big_leaves.set()
    await asyncio.gather(small, big)
    assert budget.held == 0


async def test_a_waiting_message_is_passed_by_at_most_the_budget() -> None:
    """Small mail passes a big message that waits, but only the budget's worth of it: then
    it queues behind, the holders drain, and the big one gets in."""
    budget = ByteBudget(10 * MIB)
    entered: list[int] = []
    first_leaves = asyncio.Event()
    first = asyncio.create_task(hold(budget, 6 * MIB, entered, first_leaves))
    await settled()
    big = asyncio.create_task(hold(budget, 8 * MIB, entered, asyncio.Event()))
    await settled()
    small_leave = [asyncio.Event() for _ in range(12)]
    smalls = []
    for event in small_leave:
        smalls.append(asyncio.create_task(hold(budget, MIB, entered, event)))
        await settled()
        event.set()  # each small message is gone at once, as fast small mail is
        await settled()
    # 10 of them passed the big one; the 11th and 12th wait behind it
    assert entered == [6 * MIB] + [MIB] * 10
    first_leaves.set()
    await settled()
    assert entered == [6 * MIB] + [MIB] * 10 + [8 * MIB, MIB, MIB]
    big.cancel()
    await asyncio.gather(first, *smalls)
    with pytest.raises(asyncio.CancelledError):
        await big
    assert budget.held == 0


async def test_a_waiter_cancelled_takes_nothing_with_it() -> None:
    budget = ByteBudget(MIB)
    entered: list[int] = []
    first_leaves = asyncio.Event()
    first = asyncio.create_task(hold(budget, MIB, entered, first_leaves))
    await settled()
    waiting = asyncio.create_task(hold(budget, MIB, entered, asyncio.Event()))
    await settled()
    waiting.cancel()
    first_leaves.set()  # room is made in the same turn as the cancel
    await first
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert entered == [MIB] and budget.held == 0
    again = asyncio.Event()
    again.set()
    await hold(budget, MIB, entered, again)
    assert budget.held == 0


async def test_sessions_over_the_budget_all_get_through(relay_factory: StartRelay) -> None:
    """Four sessions with 700 KB each against a 1 MiB budget: each waits its turn, spooled,
    and every message arrives whole."""
    relay: Harness = await relay_factory(smtp={"data_in_memory": MIB})
    body = b"z" * 78 + b"\r\n"

    async def send(number: int) -> None:
        raw = (
            f"From: {AGENT}\r\nTo: prospect@example.com\r\nSubject: budget {number}\r\n\r\n"
        ).encode() + body * 9000
        async with relay.client() as client:
            await client.login(AGENT, PASSWORD)
            await client.sendmail(AGENT, ["prospect@example.com"], raw)

    await asyncio.gather(*(send(n) for n in range(4)))
    copies = await relay.sink.expect(4)
    assert sorted(c.data.count(body) for c in copies) == [9000] * 4
    assert relay.relay.smtp.data_budget.held == 0
