"""One message id everywhere a person sees it, and logs an admin can read like Postfix's.

The id in the SMTP 250 reply is the one in `queue list`, the outbox file name, the log and the
journal; every delivery outcome, consent and download is one log line. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import Event
from tests.cli_runner import SEALRELAY, sealrelay
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, make_message
from tests.letter_site import REQUIRED, LetterSite
from tests.links.test_e2e_links import LINK
from tests.links.test_e2e_links import offer as linked_offer
from tests.support import PERSON_UA, free_port, serve_config

FIRST, SECOND = "paula@example.com", "omar@example.org"
POSTFIX_LINE = (
    r"(?P<id>[0-9a-f]{20}): to=<(?P<to>[^>]+)>, relay=(?P<relay>\S+), delay=(?P<delay>[0-9.]+),"
    r" dsn=(?P<dsn>[245]\.\d+\.\d+), status=(?P<status>sent|deferred|bounced) \((?P<reply>.*)\)$"
)


def outcome_lines(text: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in re.finditer(POSTFIX_LINE, text, re.MULTILINE)]


async def until(check: Callable[[], bool], timeout: float = 30) -> None:
    """Wait (bounded) until `check` holds; for outcomes that arrive in another process."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def write_relay_config(directory: Path, database: str, smtp_port: int) -> Path:
    return serve_config(
        directory,
        smtp_port=smtp_port,
        database_url=database,
        extra={"worker": "poll_seconds = 0.2"},
    )


def submit(port: int) -> str:
    """A wrong password first (as people type), then the message; returns the 250 reply."""
    with (
        smtplib.SMTP("127.0.0.1", port, timeout=15) as client,
        pytest.raises(smtplib.SMTPAuthenticationError),
    ):
        client.login(AGENT, "not the password")
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.login(AGENT, PASSWORD)
        client.mail(AGENT)
        for recipient in (FIRST, SECOND):
            assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(
            f"From: {AGENT}\r\nTo: {FIRST}, {SECOND}\r\nSubject: Besichtigung\r\n\r\nHallo\r\n"
        )
    assert code == 250
    return reply.decode()


async def test_one_message_id_in_reply_queue_outbox_log_and_journal(
    tmp_path: Path, database_url: str
) -> None:
    smtp_port = free_port()
    config = write_relay_config(tmp_path, database_url, smtp_port)
    added = await sealrelay("user", "add", AGENT, "--password-stdin", "-c", str(config),
                            stdin=PASSWORD)  # fmt: skip
    assert added.code == 0, added.err
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = await asyncio.create_subprocess_exec(
            str(SEALRELAY), "serve", "-c", str(config), stdout=log, stderr=log
        )
        try:
            await until(lambda: "SMTP listening" in log_path.read_text())
            reply = await asyncio.to_thread(submit, smtp_port)
            [message_id] = re.findall(r"queued as ([0-9a-f]{20})$", reply)
            await until(lambda: len(outcome_lines(log_path.read_text())) == 2)
            listed = await sealrelay("queue", "list", "--all", "-c", str(config))
        finally:
            serve.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await serve.wait()

    outbox = tmp_path / "outbox"
    assert sorted(p.name for p in outbox.iterdir()) == [f"{message_id}.eml", f"{message_id}.json"]

    assert listed.code == 0, listed.err
    head, *copies = listed.out.splitlines()
    assert head.startswith(f"{message_id}  ") and f"{AGENT}  'Besichtigung'" in head
    assert sorted(line.split()[:2] for line in copies) == [
        ["delivered", SECOND],
        ["delivered", FIRST],
    ]
    assert all(line.startswith("    ") and "attempts=1" in line for line in copies)

    log_text = log_path.read_text()
    outcomes = outcome_lines(log_text)
    assert {line["to"] for line in outcomes} == {FIRST, SECOND}
    for line in outcomes:
        assert line["id"] == message_id
        assert line["relay"] == f"capture:{outbox}"
        assert (line["dsn"], line["status"]) == ("2.0.0", "sent")
        assert line["reply"] == f"written to {outbox / message_id}.eml"
    assert re.search(rf"{message_id}: from=<{AGENT}>, size=[0-9]+, nrcpt=2 \(accepted\)", log_text)
    assert f"failed login '{AGENT}' from 127.0.0.1" in log_text
    assert "login_data is deprecated" not in log_text
    assert not re.search(r"\bb['\"]", log_text), log_text

    db = Database.connect(database_url)
    try:
        async with db.transaction() as session:
            events = (await session.scalars(select(Event).order_by(Event.id))).all()
    finally:
        await db.close()
    assert [e.type for e in events if e.message_id is None] == ["user.created"]
    assert {e.message_id for e in events if e.message_id is not None} == {message_id}
    assert [e.type for e in events].count("delivery.delivered") == 2


async def test_every_delivery_outcome_is_one_postfix_style_line(
    relay: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    later, unknown = "later@example.net", "nobody@example.org"
    relay.sink.refuse = {later: "451 4.3.0 try again later", unknown: "550 5.1.1 no such user"}
    reply = await relay.send(
        make_message(to=f"{FIRST}, {later}, {unknown}"), recipients=[FIRST, later, unknown]
    )
    [message_id] = re.findall(r"queued as ([0-9a-f]{20})$", reply)
    await until(lambda: len(outcome_lines(caplog.text)) >= 3)
    by_recipient = {line["to"]: line for line in outcome_lines(caplog.text)}
    upstream = f"127.0.0.1:{relay.sink.port}"
    assert by_recipient[FIRST] | {"delay": ""} == {
        "id": message_id,
        "to": FIRST,
        "relay": upstream,
        "delay": "",
        "dsn": "2.0.0",
        "status": "sent",
        "reply": "250 OK stored",
    }
    assert by_recipient[later]["status"] == "deferred"
    assert (by_recipient[later]["dsn"], by_recipient[later]["reply"]) == (
        "4.3.0",
        "451 4.3.0 try again later",
    )
    assert by_recipient[unknown]["status"] == "bounced"
    assert (by_recipient[unknown]["dsn"], by_recipient[unknown]["reply"]) == (
        "5.1.1",
        "550 5.1.1 no such user",
    )
    assert all(float(line["delay"]) >= 0 for line in by_recipient.values())
    assert "login_data is deprecated" not in caplog.text


async def test_a_consent_is_one_log_line(
    site: LetterSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token, _ = await site.send_offer()
    response = await site.consent(token, REQUIRED)
    assert response.status in (200, 303)
    async with site.relay.db.transaction() as session:
        [given] = (await session.scalars(select(Event).where(Event.type == "consent.given"))).all()
    lines = [r.getMessage() for r in caplog.records if "consent=" in r.getMessage()]
    assert lines == [
        f"{given.message_id}: consent={given.data['consent_id']} to=<{given.data['recipient']}>,"
        f" ip=127.0.0.1, letter={given.data['letter_id']}, status=released"
    ]


@pytest.fixture
async def relay_with_links(relay_factory: StartRelay) -> Harness:
    return await relay_factory(smtp={"max_message_size": 50 * 1024 * 1024})


async def test_a_download_is_one_log_line(
    relay_with_links: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = relay_with_links
    reply = await relay.send(linked_offer(), recipients=[FIRST])
    [message_id] = re.findall(r"queued as ([0-9a-f]{20})$", reply)
    [copy] = await relay.sink.expect(1)
    [token] = set(LINK.findall(copy.data.decode(errors="replace")))
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(f"{relay.web_url}/d/{token}") as page:
            [file_path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', await page.text())
        for _ in range(2):
            async with http.get(f"{relay.web_url}{file_path}") as download:
                assert download.status == 200
                await download.read()
    lines = [r.getMessage() for r in caplog.records if "download=" in r.getMessage()]
    file_id = file_path.rpartition("/")[2]
    expected = (
        f"{message_id}: download={{}} to=<{FIRST}>, ip=127.0.0.1,"
        f' file={file_id} "Exposé Müllerstraße.pdf"'
    )
    assert lines == [expected.format("first"), expected.format("repeat")]
