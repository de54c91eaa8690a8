"""A blob store that cannot be reached is temporary trouble, never a missing file.

The S3 store reaches moto's server through a door the test shuts (tests/s3_server.py
S3Door: refused connections, cut kept connections) or turns to answering 503 SlowDown; the
local store's directory is moved away, as a disk unmounted. Through the real interfaces: a
prospect's download over HTTP (503 with Retry-After, then 200), SMTP intake (451 4.3.0,
nothing written), delivery (deferred, retried, never bounced).
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import logging
import re
import signal
import sys
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from sqlalchemy import func, select, update

from gateway.fronts.smtp import Reply
from gateway.store.blobs import BlobMissing, BlobStore, StoreUnavailable
from gateway.store.db import Database
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Consent, Delivery, DeliveryStatus, Event, Message
from tests.conftest import AGENT, StartRelay, make_message
from tests.fronts.milter_client import MilterClient
from tests.letter_site import LetterSite
from tests.links.test_downloads import Clock, running_pages, text_of
from tests.outbound.test_delivery import eventually
from tests.queue_wait import queue_idle
from tests.s3_server import KEY_ID, REGION, SECRET, S3Door, S3Server
from tests.support import free_port, serve_config, wait_for_port


class Outages:
    """A store of each kind with the means to take it down and bring it back."""

    def __init__(self, kind: str, tmp_path: Path, door: S3Door, bucket: str) -> None:
        self.kind = kind
        self.root = tmp_path / "blobs"
        self.door = door
        self.bucket = bucket

    def store(self) -> BlobStore:
        if self.kind == "local":
            return LocalBlobStore(self.root)
        return self.door.store(self.bucket)

    def storage(self, tmp_path: Path) -> dict[str, Any]:
        """The `[storage]` section of a relay on this store."""
        if self.kind == "local":
            return {"path": str(self.root)}
        secret = tmp_path / "s3.secret"
        secret.write_text(SECRET)
        secret.chmod(0o600)
        return {
            "path": str(self.root),
            "url": f"s3://{self.bucket}/relay",
            "endpoint_url": self.door.endpoint_url,
            "region": REGION,
            "addressing_style": "path",
            "access_key_id": KEY_ID,
            "secret_access_key_file": str(secret),
        }

    async def down(self) -> None:
        if self.kind == "local":
            self.root.rename(self.root.with_name("blobs-unmounted"))
        elif self.kind == "s3-503":
            self.door.answering_503 = True
        else:
            await self.door.shut()

    async def up(self) -> None:
        if self.kind == "local":
            self.root.with_name("blobs-unmounted").rename(self.root)
        elif self.kind == "s3-503":
            self.door.answering_503 = False
        else:
            await self.door.open()

    def said_by_a_read(self, reason: str) -> bool:
        """Whether `reason` is a read's (or a look-up's) failure, not the health check's
        ("cannot list" the prefix; the local tmp directory "not there")."""
        if self.kind == "local":
            return reason.startswith(("cannot read in", "cannot open in", "cannot look up in"))
        return reason.startswith(("cannot read s3://", "cannot look up s3://"))

    def leftovers(self, s3: S3Server) -> list[str]:
        """What a put left behind in the store: temp files, objects, multipart uploads."""
        if self.kind == "local":
            return sorted(p.name for p in self.root.rglob("*") if p.is_file())
        client = s3.client()
        objects = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return [o["Key"] for o in objects] + [u["Key"] for u in uploads]


KINDS = ["local", "s3-down", "s3-503"]


@pytest.fixture
async def door(s3_server: S3Server) -> AsyncIterator[S3Door]:
    async with S3Door(s3_server) as opened:
        yield opened


@pytest.fixture(params=KINDS)
def outages(
    request: pytest.FixtureRequest, tmp_path: Path, door: S3Door, s3_bucket: str
) -> Outages:
    return Outages(request.param, tmp_path, door, s3_bucket)


async def test_a_store_down_is_unavailable_and_a_missing_blob_stays_missing(
    outages: Outages,
) -> None:
    store = outages.store()
    digest = await store.put(b"kept through the outage")
    missing = "0" * 64
    await outages.down()
    for call in (
        lambda: store.read(digest),
        lambda: store.size(digest),
        lambda: store.exists(digest),
        lambda: store.read(missing),
        lambda: store.put(b"new bytes"),
        lambda: store.check(),
    ):
        with pytest.raises(StoreUnavailable) as raised:
            await call()
        assert not isinstance(raised.value, BlobMissing)
    await outages.up()
    await store.check()
    assert await store.read(digest) == b"kept through the outage"
    with pytest.raises(BlobMissing):
        await store.read(missing)
    await store.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_download_while_the_store_is_down_is_a_503_then_a_200(
    database: Database,
    tmp_path: Path,
    outages: Outages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    content = b"%PDF the expose" * 1000
    blobs = outages.store()
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link([("Exposé.pdf", "application/pdf", content)], language="de")
        path = made.file_path(made.files[0])
        await outages.down()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for where in (path, made.path("/zip")):
                response, body = await pages.get(where)
                assert response.status == 503, where
                assert response.headers["Retry-After"] == "60"
                assert "Vorübergehend nicht erreichbar" in text_of(body)  # the link's language
        logged = " ".join(record.getMessage() for record in caplog.records)
        assert "blob store unavailable" in logged
        assert "missing" not in logged
        assert not pages.relay.blob_health.available
        assert outages.said_by_a_read(degraded_by(caplog)), logged  # not by a check
        async with database.transaction() as session:
            downloads = await session.scalar(
                select(func.count()).select_from(Event).where(Event.type.like("download.%"))
            )
        assert downloads == 0  # nothing was served, nothing counted
        await outages.up()
        response, body = await pages.get(path)
        assert response.status == 200 and body == content
    await blobs.close()


# Over [storage] inline_max_bytes: a smaller message lives in the database and never
# touches the store (tests/store/test_inline_blobs.py).
FILE_SIZED = "Die Unterlagen folgen.\n" * 4000


async def messages(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)
async def test_smtp_intake_with_the_store_down_answers_451_and_writes_nothing(
    relay_factory: StartRelay,
    database: Database,
    tmp_path: Path,
    outages: Outages,
    s3_server: S3Server,
) -> None:
    harness = await relay_factory(storage=outages.storage(tmp_path))
    before = outages.leftovers(s3_server)
    await outages.down()
    # at the end of DATA when the put fails; at MAIL FROM once the relay knows (a check)
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await harness.send(make_message(subject="während des Ausfalls", body=FILE_SIZED))
    assert refused.value.code == 451
    assert refused.value.message.startswith("4.3.0")
    assert not harness.relay.blob_health.available  # the failed put said so
    await outages.up()
    assert await messages(database) == 0
    assert outages.leftovers(s3_server) == before
    await until_healthy(harness.web_url)
    await harness.send(make_message(subject="danach"))
    assert await messages(database) == 1
    [received] = await harness.sink.expect(1)
    assert b"danach" in received.data


PROSPECT = "prospect@example.com"


def milter_raw(subject: str, body: str = "Guten Tag!\n") -> bytes:
    message = make_message(to=PROSPECT, subject=subject, body=body)
    return message.as_bytes(policy=email.policy.SMTP)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("outages", ["local", "s3-down"], indirect=True)
async def test_the_milter_with_the_store_down_tempfails_then_refuses_at_mail_from(
    relay_factory: StartRelay,
    database: Database,
    tmp_path: Path,
    outages: Outages,
    s3_server: S3Server,
) -> None:
    """As the SMTP front: the first message finds out at its end, the next hears 451 at
    MAIL FROM, so Postfix keeps them queued without sending the data; nothing is written."""
    harness = await relay_factory(
        storage=outages.storage(tmp_path),
        milter={"listen": f"127.0.0.1:{free_port()}"},
    )
    client = await MilterClient.open(harness.relay.milter.port)
    await client.start()
    before = outages.leftovers(s3_server)
    await outages.down()
    assert (await client.envelope(AGENT, [PROSPECT]))[-1].code == b"c"
    answers = await client.content(milter_raw("während des Ausfalls", FILE_SIZED))
    assert [(a.code, a.text) for a in answers] == [(b"y", Reply.STORE_UNAVAILABLE)]
    assert not harness.relay.blob_health.available
    refused = await client.envelope(AGENT, [PROSPECT])
    assert [(a.code, a.text) for a in refused] == [(b"y", Reply.STORE_UNAVAILABLE)]
    await outages.up()
    assert await messages(database) == 0
    assert outages.leftovers(s3_server) == before
    await until_healthy(harness.web_url)
    assert (await client.envelope(AGENT, [PROSPECT]))[-1].code == b"c"
    passed = await client.content(milter_raw("danach"))
    assert passed[-1].code == b"c"
    assert await messages(database) == 1
    await client.close()


async def set_due(db: Database, when: datetime, **values: Any) -> None:
    async with db.transaction() as session:
        await session.execute(update(Delivery).values(next_attempt_at=when, **values))


async def the_delivery(db: Database) -> Delivery:
    async with db.transaction() as session:
        return (await session.scalars(select(Delivery))).one()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_delivery_with_the_store_down_is_deferred_not_bounced_then_delivered(
    relay_factory: StartRelay, database: Database, tmp_path: Path, outages: Outages
) -> None:
    """Even past its lifetime: the relay's own store failed, not the way to the recipient,
    and a bounce could not quote the original either."""
    storage = outages.storage(tmp_path)
    intake = await relay_factory(roles={"smtp"}, storage=storage)
    await intake.send(make_message(subject="im Ausfall zugestellt", body=FILE_SIZED))
    now = datetime.now(UTC)
    await set_due(database, now + timedelta(days=1), expires_at=now - timedelta(minutes=1))
    await relay_factory(roles={"worker"}, storage=storage)
    await outages.down()
    await set_due(database, now - timedelta(seconds=1))
    async with asyncio.timeout(30):
        while (delivery := await the_delivery(database)).attempts == 0:
            await asyncio.sleep(0.05)
    assert delivery.status == DeliveryStatus.QUEUED
    assert "blob store unavailable" in (delivery.last_error or "")
    assert delivery.next_attempt_at > now  # retried later, past its lifetime too
    await outages.up()
    await set_due(database, datetime.now(UTC) - timedelta(seconds=1))
    [received] = await intake.sink.expect(1)
    assert b"im Ausfall zugestellt" in received.data
    async with database.transaction() as session:
        events = list((await session.scalars(select(Event).order_by(Event.seq))).all())
    types = [event.type for event in events]
    assert "delivery.bounced" not in types
    deferred = [event.data["error"] for event in events if event.type == "delivery.deferred"]
    assert deferred and all(e.startswith("blob store unavailable: cannot read ") for e in deferred)

    async def delivered() -> bool:  # the outcome is recorded after the sink's 250
        return (await the_delivery(database)).status == DeliveryStatus.DELIVERED

    await eventually(delivered, 30)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_small_message_is_delivered_with_the_store_down(
    relay_factory: StartRelay, database: Database, tmp_path: Path, outages: Outages
) -> None:
    """Its original lives in the database, so the store's outage does not hold it up."""
    storage = outages.storage(tmp_path)
    intake = await relay_factory(roles={"smtp"}, storage=storage)
    await intake.send(make_message(subject="klein, im Ausfall zugestellt"))
    await set_due(database, datetime.now(UTC) + timedelta(days=1))
    await relay_factory(roles={"worker"}, storage=storage)
    await outages.down()
    await set_due(database, datetime.now(UTC) - timedelta(seconds=1))
    [received] = await intake.sink.expect(1)
    assert b"klein, im Ausfall zugestellt" in received.data
    await queue_idle(database)
    assert (await the_delivery(database)).status == DeliveryStatus.DELIVERED
    await outages.up()


def degraded_by(caplog: pytest.LogCaptureFixture) -> str:
    """Why the relay said it became degraded (it says so once, when it does)."""
    [reason] = [
        record.getMessage().partition("the relay is degraded: ")[2]
        for record in caplog.records
        if "the relay is degraded: " in record.getMessage()
    ]
    return reason


@pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)
async def test_a_read_that_fails_in_delivery_degrades_the_relay_at_once(
    relay_factory: StartRelay,
    database: Database,
    tmp_path: Path,
    outages: Outages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The delivery's failed read, not the next check (up to 30 s later), makes SMTP and
    /healthz say the store is unavailable; a small message, which needs no store, hears 451
    at MAIL FROM all the same (the relay cannot know its size there). The checks, woken by
    the failure, make the relay whole again once the store is back."""
    storage = outages.storage(tmp_path)
    intake = await relay_factory(roles={"smtp"}, storage=storage)
    await intake.send(make_message(subject="beim Lesen ausgefallen", body=FILE_SIZED))
    await set_due(database, datetime.now(UTC) + timedelta(days=1))
    # no sweep: its listing would fail too, and say so before the delivery
    harness = await relay_factory(storage=storage, singletons=False)
    assert harness.relay.blob_health.available
    await outages.down()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.store.health"):
        await set_due(database, datetime.now(UTC) - timedelta(seconds=1))
        async with asyncio.timeout(30):
            while (await the_delivery(database)).attempts == 0:
                await asyncio.sleep(0.05)
        assert not harness.relay.blob_health.available
        assert outages.said_by_a_read(degraded_by(caplog)), degraded_by(caplog)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await harness.send(make_message(subject="klein, aber zu früh"))
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    status, said = await healthz(harness.web_url)
    assert (status, said["blob_store"]) == (503, "unavailable")
    await outages.up()
    await until_healthy(harness.web_url)
    await set_due(database, datetime.now(UTC) - timedelta(seconds=1))
    [received] = await intake.sink.expect(1)
    assert b"beim Lesen ausgefallen" in received.data
    assert await messages(database) == 1


async def healthz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return response.status, await response.json()


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    [line] = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def until_healthy(url: str, timeout: float = 60) -> None:
    """Until /healthz says ok: the relay checks the store again after 1, 2, 4 ... s."""
    async with asyncio.timeout(timeout):
        while (await healthz(url))[0] != 200:
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("outages", ["s3-down", "s3-503"], indirect=True)
async def test_a_relay_starts_degraded_without_its_bucket_and_recovers(
    relay_factory: StartRelay, database: Database, tmp_path: Path, outages: Outages
) -> None:
    storage = outages.storage(tmp_path)
    await outages.down()
    harness = await relay_factory(storage=storage)  # starts all the same
    assert await healthz(harness.web_url) == (
        503,
        {"status": "degraded", "database": "ok", "blob_store": "unavailable"},
    )
    assert await metric(harness.web_url, "sealrelay_blob_store_available") == 0
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await harness.send(make_message(subject="zu früh"))
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    assert await messages(database) == 0
    await outages.up()
    await until_healthy(harness.web_url)
    assert await metric(harness.web_url, "sealrelay_blob_store_available") == 1
    await harness.send(make_message(subject="wieder da"))
    [received] = await harness.sink.expect(1)
    assert b"wieder da" in received.data


SEALRELAY = str(Path(sys.executable).parent / "sealrelay")


@pytest.mark.slow
async def test_serve_starts_degraded_while_check_config_refuses_the_bucket(
    tmp_path: Path, door: S3Door, s3_bucket: str
) -> None:
    """`check-config` is there to say the bucket cannot be used; `serve` starts without it."""
    outages = Outages("s3-down", tmp_path, door, s3_bucket)
    storage = "\n".join(f"{k} = {json.dumps(v)}" for k, v in outages.storage(tmp_path).items())
    smtp_port, web_port = free_port(), free_port()
    config = serve_config(
        tmp_path,
        smtp_port=smtp_port,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
        extra={"web": f'listen = "127.0.0.1:{web_port}"'},
    )
    text = config.read_text()
    text = text.replace(f'[storage]\npath = "{tmp_path / "blobs"}"\n', f"[storage]\n{storage}\n")
    text = re.sub(r'\[web\]\nlisten = "[^"]+"\n', "[web]\n", text, count=1)
    config.write_text(text)
    await door.shut()
    checked = await asyncio.create_subprocess_exec(
        SEALRELAY, "check-config", "--config", str(config), stdout=PIPE, stderr=STDOUT
    )
    said = (await checked.communicate())[0].decode()
    assert checked.returncode != 0
    assert f"storage.url: cannot list s3://{s3_bucket}/relay/" in said, said
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            SEALRELAY, "serve", "--config", str(config), stdout=log, stderr=log
        )
        try:
            await wait_for_port(web_port, process)
            await wait_for_port(smtp_port, process)
            url = f"http://127.0.0.1:{web_port}"
            assert (await healthz(url))[1]["blob_store"] == "unavailable"
            await door.open()
            await until_healthy(url)
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                code = await process.wait()
    assert code == 0
    logged = log_path.read_text()
    assert "blob store unavailable, the relay is degraded" in logged
    assert "blob store available again" in logged


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_letters_pages_while_the_store_is_down_are_503_then_200(
    site: LetterSite,
) -> None:
    """The consent, the offer and the consent PDF: 503 in the letter's language, nothing
    written, and all there once the store's directory is back."""
    token, _ = await site.send_offer()
    root = site.relay.settings.storage.path
    away = root.with_name("blobs-unmounted")
    root.rename(away)
    response = await site.consent(token)
    assert response.status == 503 and response.headers["Retry-After"] == "60"
    assert await site.count(Consent) == 0
    assert not await site.events("consent.given", "letter.released")
    away.rename(root)
    assert (await site.consent(token)).status == 303
    root.rename(away)
    for path in ("/offer", "/consent.pdf"):
        response, body = await site.get(f"/l/{token}{path}")
        assert response.status == 503, path
        assert "Vorübergehend nicht erreichbar" in text_of(body)
    away.rename(root)
    for path in ("/offer", "/consent.pdf"):
        response, _ = await site.get(f"/l/{token}{path}")
        assert response.status == 200, path


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("outages", ["local"], indirect=True)
async def test_the_503_page_reads_clean_on_a_phone_and_a_desktop(
    database: Database, tmp_path: Path, outages: Outages
) -> None:
    """What a prospect sees while the store is down, as Chromium draws it: the link's
    language, no markup or catalog key, nothing wider than the screen."""
    from tests.browser import assert_error_page_reads_clean

    blobs = outages.store()
    async with running_pages(database, tmp_path, Clock(), blobs) as pages:
        made = await pages.link([("Exposé.pdf", "application/pdf", b"%PDF" * 100)], language="de")
        await outages.down()
        await assert_error_page_reads_clean(
            pages.url + made.file_path(made.files[0]),
            locale="en-GB",
            status=503,
            text="Vorübergehend nicht erreichbar",
            shots=tmp_path,
            name="store-down",
        )
        await outages.up()
    await blobs.close()
