"""The endpoints desk: what it refuses (bad input, SSRF), writing nothing then, and what it
journals when it changes something. SQLite and PostgreSQL."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from sqlalchemy import func, select

from gateway.store.db import Database
from gateway.store.models import Event, WebhookDelivery, WebhookEndpoint
from gateway.store.sequencer import chain_all
from gateway.webhooks import addresses, payloads
from gateway.webhooks.desk import EndpointNotFound, WebhookDesk, WebhookError
from gateway.webhooks.worker import retry_after
from tests.webhooks.receiver import Receiver

PUBLIC = "http://93.184.215.14/hooks"  # a public address; nothing is sent in these tests


async def counts(db: Database) -> tuple[int, int, int]:
    async with db.transaction() as session:
        return (
            int(await session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0),
            int(await session.scalar(select(func.count()).select_from(Event)) or 0),
            int(await session.scalar(select(func.count()).select_from(WebhookDelivery)) or 0),
        )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/h", "is loopback"),
        ("http://127.8.9.10:8080/h", "is loopback"),
        ("http://localhost/h", "is loopback"),
        ("http://[::1]/h", "is loopback"),
        ("http://[::ffff:127.0.0.1]/h", "is loopback"),
        ("http://10.1.2.3/h", "is private"),
        ("http://192.168.0.10/h", "is private"),
        ("http://172.16.5.4/h", "is private"),
        ("http://[fd00::1]/h", "is private"),
        ("http://169.254.169.254/latest/meta-data", "is link-local"),
        ("http://[fe80::1]/h", "is link-local"),
        ("http://224.0.0.1/h", "is multicast"),
        ("http://0.0.0.0/h", "is unspecified"),
        ("http://100.64.0.1/h", "is not public"),
        ("ftp://93.184.215.14/h", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http:///nohost", "names no host"),
        ("http://93.184.215.14/h#x", "fragment"),
        ("http://93.184.215.14/a b", "spaces or control"),
        ("http://93.184.215.14:99999/h", "not a URL"),
        ("http://no-such-host.invalid/h", "does not resolve"),
        ("https://" + "a" * 2000 + ".example/", "longer than"),
    ],
)
async def test_refused_urls_write_nothing(database: Database, url: str, reason: str) -> None:
    desk = WebhookDesk(database)
    before = await counts(database)
    with pytest.raises(WebhookError, match=reason):
        await desk.create(url)
    assert await counts(database) == before


async def test_allow_private_lets_an_on_premises_receiver_in(database: Database) -> None:
    desk = WebhookDesk(database)
    for url in ("http://127.0.0.1:9/h", "http://localhost/h", "http://10.0.0.5/crm"):
        created = await desk.create(url, allow_private=True)
        assert created.endpoint.allow_private
    # Turning it off again checks the URL once more.
    with pytest.raises(WebhookError, match="loopback"):
        await desk.update(created.endpoint.id, url="http://127.0.0.1/h", allow_private=False)
    assert (await desk.get(created.endpoint.id)).url == "http://10.0.0.5/crm"


async def test_create_checks_event_types_and_description(database: Database) -> None:
    desk = WebhookDesk(database)
    before = await counts(database)
    with pytest.raises(WebhookError, match=r"unknown event type\(s\): message\.sent"):
        await desk.create(PUBLIC, event_types=["message.received", "message.sent"])
    with pytest.raises(WebhookError, match="description is longer"):
        await desk.create(PUBLIC, description="x" * 501)
    assert await counts(database) == before


async def test_create_change_disable_delete_are_journaled(database: Database) -> None:
    desk = WebhookDesk(database)
    created = await desk.create(
        PUBLIC, event_types=["consent.given", "consent.given"], description="CRM", by="it@x"
    )
    endpoint = created.endpoint
    assert endpoint.event_types == ["consent.given"]
    assert created.secret.startswith("whsec_")
    assert len(payloads.secret_key(created.secret)) >= 24
    assert endpoint.secret == created.secret
    await desk.update(endpoint.id, description="CRM", thin=True)  # only thin changes
    await desk.update(endpoint.id, description="CRM")  # nothing changes: nothing journaled
    await desk.disable(endpoint.id)
    await desk.disable(endpoint.id)
    await desk.enable(endpoint.id)
    with pytest.raises(EndpointNotFound):
        await desk.enable("nope")
    await desk.delete(endpoint.id)
    with pytest.raises(EndpointNotFound):
        await desk.get(endpoint.id)
    async with database.transaction() as session:
        rows = list(await session.scalars(select(Event).order_by(Event.id)))
    assert [(e.type, e.data) for e in rows] == [
        (
            "webhook.endpoint_created",
            {
                "endpoint_id": endpoint.id,
                "url": PUBLIC,
                "event_types": ["consent.given"],
                "thin": False,
                "allow_private": False,
                "by": "it@x",
            },
        ),
        (
            "webhook.endpoint_changed",
            {"endpoint_id": endpoint.id, "changed": ["thin"], "by": "cli"},
        ),
        (
            "webhook.endpoint_disabled",
            {"endpoint_id": endpoint.id, "reason": "disabled by an admin", "by": "cli"},
        ),
        (
            "webhook.endpoint_changed",
            {"endpoint_id": endpoint.id, "changed": ["enabled"], "by": "cli"},
        ),
        ("webhook.endpoint_deleted", {"endpoint_id": endpoint.id, "url": PUBLIC, "by": "cli"}),
    ]
    assert all(created.secret not in str(e.data) for e in rows)


async def test_a_disabled_endpoint_takes_no_test_or_replay(database: Database) -> None:
    desk = WebhookDesk(database)
    created = await desk.create(PUBLIC)
    await desk.disable(created.endpoint.id)
    with pytest.raises(WebhookError, match="disabled"):
        await desk.send_test(created.endpoint.id)
    with pytest.raises(WebhookError, match="disabled"):
        await desk.replay(created.endpoint.id, seq=1)


def test_every_kind_of_address_is_judged() -> None:
    assert addresses.refusal(ipaddress.ip_address("93.184.215.14")) is None
    assert addresses.refusal(ipaddress.ip_address("2606:2800:21f:cb07:6820:80da:af6b:8b2c")) is None
    assert addresses.refusal(ipaddress.ip_address("::")) == ":: is unspecified"
    assert addresses.refusal(ipaddress.ip_address("ff02::1")) == "ff02::1 is multicast"


def test_retry_after_reads_seconds_and_http_dates_and_is_capped() -> None:
    now = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
    assert retry_after("120", now) == 120
    assert retry_after("Wed, 02 Dec 2026 12:05:00 GMT", now) == 300
    assert retry_after("Wed, 02 Dec 2026 11:00:00 GMT", now) == 0
    assert retry_after("99999999", now) == 86400
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None
    assert retry_after("", now + timedelta(0)) is None


def test_signatures_are_standard_webhooks_ones() -> None:
    from standardwebhooks import Webhook

    secret = payloads.new_secret()
    at = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
    body = b'{"type":"x"}'
    headers = payloads.headers([secret], 7, at, body)
    assert headers["webhook-id"] == "evt_7"
    assert headers["webhook-timestamp"] == str(int(at.timestamp()))
    assert headers["webhook-signature"] == Webhook(secret).sign("evt_7", at, body.decode())
    with pytest.raises(ValueError, match="whsec_"):
        payloads.secret_key("abc")
    with pytest.raises(ValueError, match="base64"):
        payloads.secret_key("whsec_!!!")


async def test_the_guarded_client_never_connects_to_a_refused_address(
    receiver: Receiver,
) -> None:
    """What the worker's client for public endpoints connects with: a name that resolves to
    loopback is refused at connect time too, not only by the check before it."""
    connector = aiohttp.TCPConnector(resolver=addresses.GuardedResolver(), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as client:
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await client.post(receiver.url.replace("127.0.0.1", "localhost"), data=b"{}")
    cause = refused.value.__cause__
    assert isinstance(cause, addresses.RefusedAddress), repr(cause)
    assert "is loopback" in str(cause)
    assert receiver.posts == [] and receiver.refused == []


async def test_a_range_replay_counts_only_what_the_endpoint_receives(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit counts the endpoint's own events (its types, its own tests), not the
    journal's; what is still queued is not queued twice; too many is refused whole."""
    desk = WebhookDesk(database)
    mine = (await desk.create(PUBLIC, event_types=["webhook.endpoint_changed"])).endpoint
    other = (await desk.create(PUBLIC)).endpoint
    for n in range(3):
        await desk.update(mine.id, description=f"change {n}")
    for _ in range(4):
        await desk.create(PUBLIC)  # webhook.endpoint_created: not for `mine`
    own_test = await desk.send_test(mine.id)
    other_test = await desk.send_test(other.id)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    monkeypatch.setattr("gateway.webhooks.desk.REPLAY_LIMIT", 3)
    before = await counts(database)
    with pytest.raises(WebhookError, match="more than 3 events"):
        await desk.replay(mine.id, since=since)
    assert await counts(database) == before, "refused whole: nothing queued"
    monkeypatch.setattr("gateway.webhooks.desk.REPLAY_LIMIT", 4)
    assert await desk.replay(mine.id, since=since) == 4  # three changes and its own test
    async with database.transaction() as session:
        seqs = list(
            await session.scalars(
                select(WebhookDelivery.event_seq).where(WebhookDelivery.endpoint_id == mine.id)
            )
        )
    assert own_test in seqs and other_test not in seqs
    assert await desk.replay(mine.id, since=since) == 0, "still queued: not queued twice"
    with pytest.raises(WebhookError, match="since must be before until"):
        await desk.replay(mine.id, since=since, until=since - timedelta(seconds=1))
    with pytest.raises(EndpointNotFound):
        await desk.replay("no-such-endpoint", since=since)


async def test_a_range_replay_takes_chained_events_only(database: Database) -> None:
    """An event not chained yet has no seq to post under: a replay leaves it to the fan-out,
    which posts it once it is chained."""
    desk = WebhookDesk(database)
    endpoint = (await desk.create(PUBLIC, event_types=["webhook.endpoint_changed"])).endpoint
    await desk.update(endpoint.id, description="before")
    await chain_all(database)
    await desk.update(endpoint.id, description="not chained yet")
    since = datetime(2000, 1, 1, tzinfo=UTC)
    assert await desk.replay(endpoint.id, since=since) == 1
    await chain_all(database)
    assert await desk.replay(endpoint.id, since=since) == 1  # the first is still queued
    async with database.transaction() as session:
        queued = list(
            await session.scalars(
                select(WebhookDelivery.event_seq).order_by(WebhookDelivery.event_seq)
            )
        )
        changes = list(
            await session.scalars(
                select(Event.seq)
                .where(Event.type == "webhook.endpoint_changed")
                .order_by(Event.seq)
            )
        )
    assert queued == changes and len(changes) == 2
