"""`sealrelay webhook`: the endpoints the journal's events are posted to."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import click

from gateway.store.db import Database
from gateway.store.models import WebhookEndpoint, utcnow
from gateway.webhooks.desk import (
    Created,
    DeliveryView,
    PrivateUrlRefused,
    WebhookDesk,
    WebhookError,
)
from sealrelay.commands.common import Access, T, config_option, run

_run = functools.partial(run, refused=(WebhookError,))


@click.group("webhook")
def webhook_group() -> None:
    """Webhook endpoints: where the journal's events are posted (docs/webhooks.md)."""


def _desk_run(
    work: Callable[[WebhookDesk], Awaitable[T]], config: Path | None, access: Access
) -> T:
    async def with_desk(db: Database) -> T:
        try:
            return await work(WebhookDesk(db))
        except PrivateUrlRefused as exc:
            raise click.ClickException(f"{exc} (--allow-private)") from exc

    return _run(with_desk, config, access)


def _moment(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not an ISO 8601 time") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=ZoneInfo("UTC"))


def _endpoint_line(endpoint: WebhookEndpoint) -> str:
    state = "enabled" if endpoint.enabled else f"disabled ({endpoint.disabled_reason or '-'})"
    flags = [f for f, on in (("thin", endpoint.thin), ("private", endpoint.allow_private)) if on]
    types = ",".join(endpoint.event_types) or "all events"
    extra = f"  [{' '.join(flags)}]" if flags else ""
    about = f"  {endpoint.description!r}" if endpoint.description else ""
    return f"{endpoint.id}  {endpoint.url}  {state}  {types}{extra}{about}"


@webhook_group.command("add")
@config_option
@click.argument("url")
@click.option(
    "--event", "events", multiple=True, help="An event type to post (repeat); all if none."
)
@click.option("--thin", is_flag=True, help="Ids only: no personal fields in payloads.")
@click.option("--allow-private", is_flag=True, help="May resolve to loopback or private addresses.")
@click.option("--description", default="", help="What the endpoint is for.")
def webhook_add(
    config: Path | None,
    url: str,
    events: tuple[str, ...],
    thin: bool,
    allow_private: bool,
    description: str,
) -> None:
    """Add an endpoint; prints its signing secret, this once."""

    async def add(desk: WebhookDesk) -> Created:
        return await desk.create(
            url,
            event_types=events,
            thin=thin,
            allow_private=allow_private,
            description=description,
        )

    created = _desk_run(add, config, Access.WRITE)
    click.echo(_endpoint_line(created.endpoint))
    click.echo(f"secret: {created.secret}  (shown once; the receiver verifies with it)")


@webhook_group.command("change")
@config_option
@click.argument("endpoint_id")
@click.option("--url", help="A new URL (checked again, as on add).")
@click.option(
    "--event", "events", multiple=True, help="The event types to post (repeat); replaces them."
)
@click.option("--all-events", is_flag=True, help="Post every event type from now on.")
@click.option("--thin/--full", default=None, help="Ids only, or full payloads.")
@click.option("--allow-private/--public-only", default=None, help="May reach private addresses.")
@click.option("--description", help="What the endpoint is for.")
def webhook_change(
    config: Path | None,
    endpoint_id: str,
    url: str | None,
    events: tuple[str, ...],
    all_events: bool,
    thin: bool | None,
    allow_private: bool | None,
    description: str | None,
) -> None:
    """Change an endpoint; what is not given stays as it is."""
    if events and all_events:
        raise click.UsageError("give either --event TYPE ... or --all-events")
    types: list[str] | None = list(events) if events else ([] if all_events else None)

    async def change(desk: WebhookDesk) -> WebhookEndpoint:
        return await desk.update(
            endpoint_id,
            url=url,
            event_types=types,
            description=description,
            thin=thin,
            allow_private=allow_private,
            by="cli",
        )

    click.echo(_endpoint_line(_desk_run(change, config, Access.WRITE)))


@webhook_group.command("list")
@config_option
def webhook_list(config: Path | None) -> None:
    """Every endpoint with its state and the events it receives."""
    endpoints = _desk_run(lambda desk: desk.list_endpoints(), config, Access.READ)
    if not endpoints:
        click.echo("no webhook endpoints")
    for endpoint in endpoints:
        click.echo(_endpoint_line(endpoint))


@webhook_group.command("disable")
@config_option
@click.argument("endpoint_id")
def webhook_disable(config: Path | None, endpoint_id: str) -> None:
    """Stop posting to an endpoint; its queued deliveries are given up."""
    endpoint = _desk_run(lambda desk: desk.disable(endpoint_id), config, Access.WRITE)
    click.echo(_endpoint_line(endpoint))


@webhook_group.command("enable")
@config_option
@click.argument("endpoint_id")
def webhook_enable(config: Path | None, endpoint_id: str) -> None:
    """Post to an endpoint again, from now on (`replay` sends what it missed)."""
    endpoint = _desk_run(lambda desk: desk.enable(endpoint_id), config, Access.WRITE)
    click.echo(_endpoint_line(endpoint))


@webhook_group.command("delete")
@config_option
@click.argument("endpoint_id")
def webhook_delete(config: Path | None, endpoint_id: str) -> None:
    """Delete an endpoint and its delivery history."""
    _desk_run(lambda desk: desk.delete(endpoint_id), config, Access.WRITE)
    click.echo(f"{endpoint_id} deleted")


@webhook_group.command("rotate-secret")
@config_option
@click.argument("endpoint_id")
def webhook_rotate(config: Path | None, endpoint_id: str) -> None:
    """A new signing secret; the old one keeps signing beside it for 24 hours."""
    secret = _desk_run(lambda desk: desk.rotate_secret(endpoint_id), config, Access.WRITE)
    click.echo(f"secret: {secret}  (shown once; the previous one signs too for 24 hours)")


@webhook_group.command("test")
@config_option
@click.argument("endpoint_id")
def webhook_test(config: Path | None, endpoint_id: str) -> None:
    """Post a `webhook.test` event to the endpoint (a running relay sends it)."""
    seq = _desk_run(lambda desk: desk.send_test(endpoint_id), config, Access.WRITE)
    click.echo(f"test event evt_{seq} queued for {endpoint_id}")


@webhook_group.command("deliveries")
@config_option
@click.argument("endpoint_id")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
def webhook_deliveries(config: Path | None, endpoint_id: str, limit: int) -> None:
    """The endpoint's recent deliveries, newest first."""
    rows: list[DeliveryView] = _desk_run(
        lambda desk: desk.deliveries(endpoint_id, limit), config, Access.READ
    )
    if not rows:
        click.echo("no deliveries yet")
    for d in rows:
        code = d.last_status_code if d.last_status_code is not None else "-"
        error = f"  {d.last_error}" if d.last_error else ""
        click.echo(
            f"evt_{d.event_seq}  {d.event_type}  {d.status}  attempts={d.attempts}  code={code}"
            f"  at={d.updated_at:%Y-%m-%d %H:%M:%S}Z{error}"
        )


@webhook_group.command("replay")
@config_option
@click.argument("endpoint_id")
@click.option("--event", "seq", type=int, help="The seq of one event to post again.")
@click.option("--since", help="Post again the events from this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="... up to this time (exclusive; default: now).")
def webhook_replay(
    config: Path | None, endpoint_id: str, seq: int | None, since: str | None, until: str | None
) -> None:
    """Post events again with their own webhook-id: one (--event) or a range (--since).

    A range takes every event of the endpoint's types, in order, leaving out those already
    queued for it; more than 10,000 is refused (replay shorter ranges one after another)."""
    if (seq is None) == (since is None):
        raise click.UsageError("give either --event SEQ or --since TIME [--until TIME]")
    start = _moment(since) if since else None
    end = _moment(until) if until else (utcnow() if since else None)
    count = _desk_run(
        lambda desk: desk.replay(endpoint_id, seq=seq, since=start, until=end),
        config,
        Access.WRITE,
    )
    click.echo(f"{count} event(s) queued again for {endpoint_id}")
