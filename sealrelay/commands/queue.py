"""`sealrelay queue`: list, retry and delete queued copies."""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path

import click

from gateway.outbound import queue
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, utcnow
from sealrelay.commands.common import Access, config_option, run, settings_for

_run = functools.partial(run, refused=(queue.QueueError,))


def shown_subject(subject: str, limit: int = 40) -> str:
    """Quoted with escapes, so that a control character in it cannot move the terminal; a cut
    one ends in an ellipsis, so it is not read as the whole subject."""
    return repr(subject if len(subject) <= limit else subject[: limit - 1] + "…")


@click.group("queue")
def queue_group() -> None:
    """The outbound queue."""


@queue_group.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Include delivered, bounced, deleted.")
def queue_list(config: Path | None, show_all: bool) -> None:
    """Messages with copies waiting for delivery, each copy under its message's id."""
    statuses = list(DeliveryStatus) if show_all else [DeliveryStatus.QUEUED]

    async def fetch(db: Database) -> list[queue.Claimed]:
        async with db.transaction() as session:
            return await queue.list_deliveries(session, statuses)

    rows = _run(fetch, config)
    if not rows:
        click.echo("the queue is empty")
    by_message: dict[str, list[queue.Claimed]] = {}
    for row in rows:
        by_message.setdefault(row.message.id, []).append(row)
    for copies in by_message.values():
        m = copies[0].message
        received = f"{m.received_at:%Y-%m-%d %H:%M:%S}Z"
        click.echo(f"{m.id}  {received}  {m.sender or '<>'}  {shown_subject(m.subject)}")
        for copy in copies:
            d = copy.delivery
            error = f"  last error: {d.last_error}" if d.last_error else ""
            click.echo(
                f"    {d.status:<9} {d.recipient}  attempts={d.attempts}"
                f"  next={d.next_attempt_at:%Y-%m-%d %H:%M:%S}Z{error}"
            )


@queue_group.command("retry")
@config_option
@click.argument("message_id")
@click.argument("recipients", nargs=-1)
def queue_retry(config: Path | None, message_id: str, recipients: tuple[str, ...]) -> None:
    """Try a message's queued (or bounced) copies again now; only to RECIPIENTS if given."""
    from sealrelay.serve import blob_store

    settings = settings_for(config)
    lifetime = timedelta(seconds=settings.upstream.queue_lifetime)

    async def retry(db: Database) -> list[Delivery]:
        async with db.snapshot() as session:
            copies = _named(
                await queue.copies_of(session, message_id, recipients),
                message_id,
                recipients,
                {DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED},
                "queued or bounced copy to retry",
            )
        blobs = blob_store(settings, db)
        try:
            for copy in copies:
                await queue.check_kept(blobs, copy)
        finally:
            await blobs.close()
        async with db.transaction() as session:
            for copy in copies:
                await queue.retry_now(session, copy.id, utcnow(), lifetime)
        return copies

    for copy in _run(retry, config, Access.WRITE):
        click.echo(
            f"{copy.message_id}: {copy.recipient} will be retried now (a running relay picks it up)"
        )


@queue_group.command("delete")
@config_option
@click.argument("message_id")
@click.argument("recipients", nargs=-1)
def queue_delete(config: Path | None, message_id: str, recipients: tuple[str, ...]) -> None:
    """Drop a message's queued copies (only to RECIPIENTS if given) without a bounce."""

    async def remove(db: Database) -> list[Delivery]:
        async with db.transaction() as session:
            copies = _named(
                await queue.copies_of(session, message_id, recipients),
                message_id,
                recipients,
                {DeliveryStatus.QUEUED},
                "queued copy to delete",
            )
            for copy in copies:
                await queue.delete(session, copy.id, utcnow())
            return copies

    for copy in _run(remove, config, Access.WRITE):
        click.echo(f"{copy.message_id}: {copy.recipient} deleted")


def _named(
    copies: list[Delivery],
    message_id: str,
    recipients: tuple[str, ...],
    statuses: set[DeliveryStatus],
    wanted: str,
) -> list[Delivery]:
    """The copies to act on, or the line saying why there are none."""
    if not copies:
        to = f" to {', '.join(recipients)}" if recipients else ""
        raise click.ClickException(f"no message {message_id}{to} in the queue")
    chosen = [copy for copy in copies if copy.status in statuses]
    if not chosen:
        raise click.ClickException(f"message {message_id} has no {wanted}")
    return chosen
