"""Leases, retries and backoff for every queue the relay works off: mail copies and webhooks.

A row of such a queue has an `id`, a `status` (one value of which means "queued"), a
`next_attempt_at`, and the lease: `lease_until` and `leased_by`. A worker claims due rows by
setting a lease; on PostgreSQL `FOR UPDATE SKIP LOCKED` lets several instances claim at once
without blocking each other or taking the same row. A lease that runs out (its worker died)
makes the row claimable again: work is done at least once. Outcomes are recorded only by the
worker that still holds the lease (`settle`), so a worker that lost its lease cannot overwrite
the outcome of the one that took over. One implementation for both queues, as Postal's one
locking concern serves its mail queue and its webhooks.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Table,
    Update,
    bindparam,
    case,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.raw_sql import RawStatement


def backoff(attempts: int, base: float, cap: float, jitter: float = 0.0) -> timedelta:
    """Wait before the next try: doubling from `base`, at most `cap`, stretched by jitter.

    `jitter` in [0, 1) spreads retries of many rows that failed together.
    """
    # Past ~1000 doublings 2.0**n overflows a float; any base has reached the cap long before.
    doublings = max(0, attempts - 1)
    seconds = cap if doublings >= 1000 else min(cap, base * 2.0**doublings)
    return timedelta(seconds=seconds * (1 + jitter / 4))


def scheduled(attempts: int, schedule: Sequence[float], jitter: float = 0.0) -> timedelta | None:
    """Wait before the next try after `attempts` failed ones, by a fixed schedule of seconds
    stretched by jitter as `backoff` does; None once the schedule is used up (give up)."""
    if attempts < 1 or attempts > len(schedule):
        return None
    return timedelta(seconds=schedule[attempts - 1] * (1 + jitter / 4))


@dataclass(frozen=True)
class LeasedQueue:
    """The lease operations over one queue table (`table` is its mapped class)."""

    table: Any
    queued: str

    async def claim(
        self,
        session: AsyncSession,
        worker: str,
        now: datetime,
        lease: timedelta,
        limit: int,
        *conditions: ColumnElement[bool],
    ) -> list[str]:
        """Lease up to `limit` due, unleased rows (oldest due first, meeting `conditions`) to
        `worker`; their ids."""
        return await session.run_sync(
            lambda sync: self.claim_rows(sync.connection(), worker, now, lease, limit, *conditions)
        )

    def claim_rows(
        self,
        connection: Connection,
        worker: str,
        now: datetime,
        lease: timedelta,
        limit: int,
        *conditions: ColumnElement[bool],
    ) -> list[str]:
        """`claim` on a plain connection, for a group commit's unit
        (gateway/store/group_commit.py)."""
        t = self.table.__table__
        params = {"now": now, "until": now + lease, "worker": worker, "limit": limit}
        if conditions:
            statement = _claim_statement(t, self.queued, *conditions)
            return list(connection.execute(statement, params).scalars().all())
        return [row[0] for row in _cached_claim(t, self.queued).rows(connection, params)]

    async def renew(
        self,
        session: AsyncSession,
        ids: Collection[str],
        worker: str,
        now: datetime,
        lease: timedelta,
    ) -> int:
        """Extend the lease on rows `worker` still holds (its heartbeat); how many it kept.

        A row whose lease another worker took over is left alone: its outcome is theirs. A
        row locked by an open transaction (its outcome being recorded, or another worker
        claiming it) is skipped rather than waited for: a heartbeat stuck behind one lock
        let every other lease it should keep run out.
        """
        if not ids:
            return 0
        t = self.table
        until = now + lease
        held = (
            select(t.id)
            .where(t.id.in_(list(ids)), t.leased_by == worker, t.status == self.queued)
            .with_for_update(skip_locked=True)
        )
        result = await session.execute(
            update(t)
            .where(t.id.in_(held.scalar_subquery()))
            # never shortened: a copy in flight holds a lease as long as its send may take
            .values(lease_until=case((t.lease_until > until, t.lease_until), else_=until)),
            execution_options={"synchronize_session": False},
        )
        return int(getattr(result, "rowcount", 0))

    def hold_each(
        self, connection: Connection, holds: Sequence[tuple[Collection[str], str, datetime]]
    ) -> list[set[str]]:
        """Just before the work is done, for many callers at once: each `(ids, worker,
        until)` extends the lease on the rows of `ids` that `worker` still holds to at least
        `until`; per caller, the ids it still holds. A row another worker took over while
        this one waited (its lease ran out) is theirs: doing it here too would do it twice.

        One statement reads and locks who holds the rows, one executemany extends them."""
        holders = self._holders(connection, [i for ids, _w, _u in holds for i in ids])
        held = [{i for i in ids if holders.get(i) == worker} for ids, worker, _u in holds]
        _cached_hold(self.table.__table__, self.queued).executemany(
            connection,
            [
                {"id": i, "worker": worker, "until": until}
                for (_ids, worker, until), kept in zip(holds, held, strict=True)
                for i in sorted(kept)
            ],
        )
        return held

    async def release(self, session: AsyncSession, ids: Collection[str], worker: str) -> None:
        """Give claimed rows back undone (a stopping worker), so any worker may take them now."""
        if not ids:
            return
        t = self.table
        await session.execute(
            update(t)
            .where(t.id.in_(list(ids)), t.leased_by == worker)
            .values(lease_until=None, leased_by=None),
            execution_options={"synchronize_session": False},
        )

    async def settle(
        self, session: AsyncSession, row_id: str, worker: str, **values: object
    ) -> bool:
        """Record one attempt's outcome (`values`) and drop the lease, if `worker` still holds
        it; False when another worker took the row over (the outcome is theirs to record)."""
        t = self.table
        result = await session.execute(
            update(t)
            .where(t.id == row_id, t.leased_by == worker, t.status == self.queued)
            .values(lease_until=None, leased_by=None, **values),
            execution_options={"synchronize_session": False},
        )
        return bool(getattr(result, "rowcount", 0))

    async def settle_many(
        self, session: AsyncSession, ids: Collection[str], worker: str, **values: object
    ) -> set[str]:
        """`settle` for many rows with the same outcome, in one statement; the ids settled."""
        if not ids:
            return set()
        t = self.table
        settled = await session.scalars(
            update(t)
            .where(t.id.in_(list(ids)), t.leased_by == worker, t.status == self.queued)
            .values(lease_until=None, leased_by=None, **values)
            .returning(t.id),
            execution_options={"synchronize_session": False},
        )
        return set(settled.all())

    def settle_each(
        self, connection: Connection, outcomes: Sequence[tuple[str, str, dict[str, object]]]
    ) -> list[bool]:
        """`settle` on a plain connection for many rows at once, for the group commit
        (gateway/store/group_commit.py): each `(row_id, worker, values)` is recorded if
        `worker` still holds the row. Per outcome, whether it was recorded.

        One statement reads and locks who holds the rows, then one executemany per set of
        columns the outcomes set (delivered, deferred and bounced differ)."""
        holders = self._holders(connection, [row_id for row_id, _w, _v in outcomes])
        recorded: list[bool] = []
        alike: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for row_id, worker, values in outcomes:
            if holders.get(row_id) != worker:
                recorded.append(False)
                continue
            holders.pop(row_id)  # settled: no longer held by anyone
            recorded.append(True)
            params = {"id": row_id, "worker": worker, **{f"v_{k}": v for k, v in values.items()}}
            alike.setdefault(tuple(sorted(values)), []).append(params)
        t = self.table.__table__
        for keys, rows in alike.items():
            _cached_settle(t, self.queued, keys).executemany(connection, rows)
        return recorded

    def _holders(self, connection: Connection, ids: Sequence[str]) -> dict[str, str | None]:
        """Who leases each still queued row of `ids`; the rows stay locked (PostgreSQL) or
        the database is (SQLite's BEGIN IMMEDIATE) until the transaction ends, so the answer
        holds for the statements that follow in it."""
        if not ids:
            return {}
        found = _cached_holders(self.table.__table__, self.queued).rows(
            connection, {"ids": sorted(set(ids))}
        )
        return dict(found)


# The hot statements are built once per table (and per set of columns an outcome sets) with
# bind parameters: building, coercing and hashing such an UPDATE for every call cost about
# 0.5 ms of CPU, five times what executing the built one costs.


def _claim_statement(t: Table, queued: str, *conditions: ColumnElement[bool]) -> Update:
    now = bindparam("now", type_=t.c.next_attempt_at.type)
    due = (
        select(t.c.id)
        .where(
            t.c.status == queued,
            t.c.next_attempt_at <= now,
            or_(t.c.lease_until.is_(None), t.c.lease_until < now),
            *conditions,
        )
        .order_by(t.c.next_attempt_at)
        .limit(bindparam("limit", type_=Integer()))
        .with_for_update(skip_locked=True)
    )
    return (
        update(t)
        .where(t.c.id.in_(due.scalar_subquery()))
        .values(
            lease_until=bindparam("until", type_=t.c.lease_until.type),
            leased_by=bindparam("worker", type_=t.c.leased_by.type),
        )
        .returning(t.c.id)
    )


@functools.cache
def _cached_claim(t: Table, queued: str) -> RawStatement:
    return RawStatement(_claim_statement(t, queued), keys=())


@functools.cache
def _cached_holders(t: Table, queued: str) -> RawStatement:
    return RawStatement(
        select(t.c.id, t.c.leased_by)
        .where(
            t.c.id.in_(bindparam("ids", expanding=True, type_=t.c.id.type)), t.c.status == queued
        )
        .order_by(t.c.id)  # locks taken in one order by every process
        .with_for_update()
    )


def _one_held(t: Table, queued: str) -> Update:
    """The row `id`, if `worker` still holds it and it is still queued."""
    return update(t).where(
        t.c.id == bindparam("id", type_=t.c.id.type),
        t.c.leased_by == bindparam("worker", type_=t.c.leased_by.type),
        t.c.status == queued,
    )


@functools.cache
def _cached_hold(t: Table, queued: str) -> RawStatement:
    until = bindparam("until", type_=t.c.lease_until.type)
    return RawStatement(
        _one_held(t, queued).values(
            lease_until=case((t.c.lease_until > until, t.c.lease_until), else_=until)
        ),
        keys=(),
    )


@functools.cache
def _cached_settle(t: Table, queued: str, keys: tuple[str, ...]) -> RawStatement:
    return RawStatement(
        _one_held(t, queued).values(
            lease_until=None,
            leased_by=None,
            **{key: bindparam(f"v_{key}", type_=t.c[key].type) for key in keys},
        ),
        keys=(),
    )
