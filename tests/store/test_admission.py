"""The visits' share of the database (gateway/store/admission.py) on real SQLite and
PostgreSQL transactions: a new visit is turned away when the share is in use, an admitted
one waits for its next transaction, and work outside a visit never queues there."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Connection, text

from gateway.store import admission, group_commit
from gateway.store.admission import Admission, Busy, visiting
from gateway.store.db import Database


async def one(db: Database) -> int:
    async with db.transaction() as session:
        return int((await session.execute(text("SELECT 1"))).scalar_one())


async def test_an_admitted_visit_waits_and_a_new_one_is_turned_away(database: Database) -> None:
    admission = Admission(limit=1, wait=0.05)
    admitted, taken = asyncio.Event(), asyncio.Event()

    async def admitted_visit() -> int:
        with visiting(admission):
            first = await one(database)
            admitted.set()
            await taken.wait()
            return first + await one(database)  # queues for the slot, never Busy

    visit = asyncio.create_task(admitted_visit())
    await admitted.wait()
    await admission.slots.acquire()  # another visit's transaction holds the one slot
    taken.set()
    with visiting(admission), pytest.raises(Busy):
        await one(database)  # a new visit: turned away after `wait`
    assert await one(database) == 1, "the relay's own work takes no slot"
    await asyncio.sleep(0.1)  # longer than `wait`: the admitted visit still waits
    assert not visit.done()
    admission.slots.release()
    assert await visit == 2
    with visiting(admission):
        assert await one(database) == 1, "the slot is free again"


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_the_group_commit_started_by_a_visit_is_no_visit(database: Database) -> None:
    """The group commit's writer starts with its first caller; when that is a visit, the
    writer of everyone's work must not carry the visit's mark. (PostgreSQL: there the units
    run in the writer's task, where the mark would show; on SQLite they run on the driver's
    thread.)"""

    def unit(connection: Connection) -> group_commit.Done[bool]:
        return group_commit.Done(admission._visit.get() is None)

    with visiting(Admission(limit=1, wait=0.05)):
        assert admission._visit.get() is not None
        assert await group_commit.submit(database, unit)
    assert await group_commit.submit(database, unit)
