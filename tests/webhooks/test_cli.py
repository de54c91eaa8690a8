"""`sealrelay webhook ...`: the real script against a database, as an admin runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import Event, WebhookDelivery, WebhookEndpoint
from tests.cli_runner import sealrelay, sqlite_url, write_config


@pytest.fixture
async def config(tmp_path: Path) -> Path:
    path = write_config(tmp_path / "cli")
    assert (await sealrelay("db", "upgrade", "-c", str(path))).code == 0
    return path


async def test_an_admin_manages_endpoints_from_the_command_line(config: Path) -> None:
    c = ("-c", str(config))
    refused = await sealrelay("webhook", "add", "http://127.0.0.1:9/h", *c)
    assert refused.code == 1
    assert "127.0.0.1 is loopback" in refused.error_line
    assert refused.error_line.endswith("(--allow-private)")
    unknown = await sealrelay("webhook", "add", "http://127.0.0.1:9/h", "--event", "nope", *c)
    assert unknown.code == 1 and "unknown event type(s): nope" in unknown.error_line

    added = await sealrelay(
        "webhook",
        "add",
        "http://127.0.0.1:9/h",
        "--allow-private",
        "--thin",
        "--event",
        "consent.given",
        "--event",
        "webhook.test",
        "--description",
        "CRM",
        *c,
    )
    assert added.code == 0, added.err
    secret = re.search(r"secret: (whsec_\S+)", added.out)
    assert secret is not None
    endpoint_id = added.out.split()[0]

    listed = await sealrelay("webhook", "list", *c)
    assert listed.code == 0
    assert f"{endpoint_id}  http://127.0.0.1:9/h  enabled  consent.given,webhook.test" in listed.out
    assert "[thin private]" in listed.out and "'CRM'" in listed.out
    assert secret.group(1) not in listed.out  # shown once only

    refused_change = await sealrelay(
        "webhook", "change", endpoint_id, "--public-only", *c
    )  # the URL is checked again: loopback without --allow-private
    assert refused_change.code == 1 and "is loopback" in refused_change.error_line
    assert refused_change.error_line.endswith("(--allow-private)")
    both = await sealrelay("webhook", "change", endpoint_id, "--event", "x", "--all-events", *c)
    assert both.code == 2
    changed = await sealrelay(
        "webhook", "change", endpoint_id, "--full", "--description", "CRM Nord", *c
    )
    assert changed.code == 0, changed.err
    assert "consent.given,webhook.test  [private]  'CRM Nord'" in changed.out

    tested = await sealrelay("webhook", "test", endpoint_id, *c)
    assert tested.code == 0 and "queued" in tested.out
    queued = re.search(r"evt_(\d+)", tested.out)
    assert queued is not None
    seq = int(queued.group(1))
    replayed = await sealrelay("webhook", "replay", endpoint_id, "--event", str(seq), *c)
    assert replayed.code == 0 and replayed.out.startswith("1 event(s) queued again")
    ranged = await sealrelay("webhook", "replay", endpoint_id, "--since", "2000-01-01T00:00:00", *c)
    # the one event in range is queued already (no relay runs here): it is not queued twice
    assert ranged.code == 0 and ranged.out.startswith("0 event(s) queued again")
    neither = await sealrelay("webhook", "replay", endpoint_id, *c)
    assert neither.code == 2 and "--event SEQ or --since" in neither.err
    bad_time = await sealrelay("webhook", "replay", endpoint_id, "--since", "yesterday", *c)
    assert bad_time.code == 2 and "not an ISO 8601 time" in bad_time.err

    deliveries = await sealrelay("webhook", "deliveries", endpoint_id, *c)
    assert deliveries.code == 0
    assert deliveries.out.count(f"evt_{seq}  webhook.test  queued  attempts=0  code=-") == 1

    rotated = await sealrelay("webhook", "rotate-secret", endpoint_id, *c)
    assert rotated.code == 0 and "whsec_" in rotated.out
    disabled = await sealrelay("webhook", "disable", endpoint_id, *c)
    assert disabled.code == 0 and "disabled (disabled by an admin)" in disabled.out
    enabled = await sealrelay("webhook", "enable", endpoint_id, *c)
    assert enabled.code == 0 and "  enabled  " in enabled.out

    db = Database.connect(sqlite_url(config))
    try:
        async with db.transaction() as session:
            endpoint = await session.get(WebhookEndpoint, endpoint_id)
            assert endpoint is not None
            assert endpoint.previous_secret == secret.group(1)
            assert endpoint.secret in rotated.out
            statuses = list(await session.scalars(select(WebhookDelivery.status)))
            assert statuses == ["failed"]  # given up when it was disabled
    finally:
        await db.close()

    deleted = await sealrelay("webhook", "delete", endpoint_id, *c)
    assert deleted.code == 0
    gone = await sealrelay("webhook", "enable", endpoint_id, *c)
    assert gone.code == 1 and gone.error_line == f"Error: no webhook endpoint {endpoint_id}"
    assert (await sealrelay("webhook", "list", *c)).out == "no webhook endpoints\n"

    db = Database.connect(sqlite_url(config))
    try:
        async with db.transaction() as session:
            types = list(await session.scalars(select(Event.type).order_by(Event.id)))
    finally:
        await db.close()
    assert types == [
        "webhook.endpoint_created",
        "webhook.endpoint_changed",  # change --full --description
        "webhook.test",
        "webhook.endpoint_changed",
        "webhook.endpoint_disabled",
        "webhook.endpoint_changed",
        "webhook.endpoint_deleted",
    ]
