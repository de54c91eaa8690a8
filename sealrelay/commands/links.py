"""`sealrelay links`: the sweep that expires links and letters and frees their files."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.store import sweeper
from gateway.store.db import Database
from gateway.store.models import utcnow
from sealrelay.commands.common import Access, config_option, run, settings_for


@click.group("links")
def links_group() -> None:
    """Personal links and the files behind them."""


@links_group.command("expire")
@config_option
def links_expire(config: Path | None) -> None:
    """Expire links and letters past their date, delete blobs nobody needs (the hourly sweep)."""
    from gateway.letters.desk import LetterDesk
    from gateway.notices.desk import NoticeDesk
    from gateway.outbound.queue_signal import QueueSignal
    from sealrelay.serve import blob_store, sweeper_for

    settings = settings_for(config)

    async def sweep(db: Database) -> sweeper.SweepReport:
        blobs = blob_store(settings, db)
        letters = LetterDesk(settings, db, blobs, QueueSignal().notify, utcnow)
        notices = NoticeDesk(settings, db, blobs, QueueSignal().notify, utcnow)
        try:
            return await sweeper_for(settings, db, blobs, letters, notices)(utcnow())
        finally:
            await blobs.close()

    report = run(sweep, config, Access.WRITE)
    click.echo(
        f"{report.links_expired} link(s) expired, {report.letters_expired} letter(s) expired,"
        f" {report.blobs_deleted} blob(s) deleted ({report.bytes_freed / 1e6:.1f} MB freed)"
    )
