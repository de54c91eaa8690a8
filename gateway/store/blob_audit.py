"""Which blobs the database still needs and the store does not hold: what a restore from
backups taken out of step, a lost disk or a hand-cleaned bucket left out.

The needed set is the sweeper's own (gateway/store/blob_columns.py), so a blob it would keep
and cannot find is reported, and one it would delete is not looked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.blob_columns import BLOB_COLUMNS, Horizon
from gateway.store.blobs import BlobStore
from gateway.store.db import Database


@dataclass(frozen=True)
class MissingBlob:
    column: str  # where the database names it: "consents.pdf_blob"
    digest: str
    kept: str  # how long that column keeps its blobs, for the reader


@dataclass(frozen=True)
class BlobAudit:
    checked: int
    missing: list[MissingBlob]


async def audit(db: Database, blobs: BlobStore, horizon: Horizon) -> BlobAudit:
    checked: set[str] = set()
    missing: list[MissingBlob] = []
    for declared in BLOB_COLUMNS:
        async with db.transaction() as session:
            digests = set((await session.scalars(declared.needed(horizon))).all())
        column = f"{declared.column.class_.__tablename__}.{declared.column.key}"
        for digest in sorted(digests - checked):
            if not await blobs.exists(digest):
                missing.append(MissingBlob(column, digest, declared.kept))
        checked |= digests
    return BlobAudit(len(checked), missing)
