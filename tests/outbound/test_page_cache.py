"""A big original, once sent, leaves the page cache: the relay keeps originals for days
(`[storage] keep_originals_days`) where Postfix deletes its queue file, and their pages
crowded the cache (10 MB rounds cost 90 ms of relay CPU per message against 59 ms with
them dropped, bench/README.md). Through a running relay, as IT runs it; `fincore`
(util-linux) says what the cache holds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sqlalchemy import select

from gateway.store.models import Message
from tests.conftest import StartRelay, make_message
from tests.queue_wait import queue_idle

NO_LINKS = {"link_attachments_over": "1TiB", "link_total_over": "1TiB"}


def resident(path: Path) -> int:
    """The bytes of `path` in the page cache."""
    fincore = shutil.which("fincore")
    assert fincore is not None, "fincore (util-linux) is needed to see the page cache"
    out = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def file_system(path: Path) -> str:
    """The type of the file system `path` is on (the longest mount point above it)."""
    mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    above = [(point, kind) for point, kind in mounts if str(path).startswith(point.rstrip("/"))]
    return max(above, key=lambda mount: len(mount[0]))[1]


async def test_a_big_original_leaves_the_page_cache_once_sent(
    relay_factory: StartRelay, tmp_path: Path
) -> None:
    assert file_system(tmp_path) != "tmpfs", "on tmpfs the cache is the file: nothing to drop"
    harness = await relay_factory(policy=NO_LINKS, smtp={"max_message_size": 8 * 1024 * 1024})
    message = make_message(subject="Grundrisse")
    message.add_attachment(
        os.urandom(2 * 1024 * 1024), maintype="application", subtype="pdf", filename="plan.pdf"
    )
    await harness.send(message)
    [copy] = await harness.sink.expect(1)
    await queue_idle(harness.relay.db)
    async with harness.relay.db.transaction() as session:
        [stored] = (await session.scalars(select(Message))).all()
    original = (
        Path(harness.settings.storage.path) / stored.blob[:2] / stored.blob[2:4] / stored.blob
    )
    assert original.stat().st_size > 2 * 1024 * 1024
    assert b"Grundrisse" in copy.data
    assert resident(original) == 0
