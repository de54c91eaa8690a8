"""Microsoft 365 / Google Workspace as smart host, simulated: the loop mark end to end.

The simulator (tests/connector_simulator.py) is a real SMTP server that takes the agents'
mail and forwards it to sealrelay's trusted listener over STARTTLS with a client
certificate; sealrelay's upstream is the simulator again (the way back). With the correct
rule the internet gets one marked, signed copy; with a broken rule sealrelay refuses the
second pass and the simulator bounces; forged marks are removed and journaled, never loops.
"""

from __future__ import annotations

import email
import email.policy
import os
import stat
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway.config import Settings
from gateway.config_check import settings_problems
from gateway.mail import headers
from gateway.mail.loop_mark import LOOP_HEADER, LoopKeyError, LoopMarks, load_or_create_key
from gateway.store.models import Delivery, Event, Message
from tests.conftest import AGENT, Harness, StartRelay, dkim_dns
from tests.connector_simulator import ConnectorSimulator
from tests.pki import Authority, Issued
from tests.queue_wait import queue_idle
from tests.support import Sink

CONNECTOR = "mail.protection.outlook.test"
PROSPECT = "prospect@example.com"
LOOP_REFUSAL = "554 5.4.6 Routing loop detected: this message was already relayed by"


@pytest.fixture(scope="module")
def connector_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Issued]:
    ca = Authority(tmp_path_factory.mktemp("m365-pki"), "m365-test-ca")
    return ca, ca.issue(CONNECTOR)


def trusted(ca: Authority) -> dict[str, object]:
    return {
        "trusted": [
            {
                "name": "m365",
                "service": "Microsoft 365 connector",
                "networks": ["127.0.0.4/31"],
                "certificate_names": [CONNECTOR],
                "client_ca": str(ca.pem),
                "require_tls": True,
            }
        ]
    }


@pytest.fixture
async def connector(
    sink: Sink, connector_certificate: tuple[Authority, Issued]
) -> AsyncIterator[ConnectorSimulator]:
    """The simulator, not yet pointed at a relay (start_relay sets its relay_port)."""
    simulator = await ConnectorSimulator(sink, 0, connector_certificate[1]).start()
    yield simulator
    await simulator.stop()


async def start_relay(
    relay_factory: StartRelay,
    simulator: ConnectorSimulator,
    ca: Authority,
    **sections: dict[str, object],
) -> Harness:
    relay = await relay_factory(
        smtp=trusted(ca),
        upstream={"url": f"smtp://127.0.0.1:{simulator.inbound_port}"},
        **sections,
    )
    simulator.relay_port = relay.smtp_port
    return relay


def agent_mail(message_id: str = "<expose-1@broker.example>", mark: str | None = None) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"Anna Agent <{AGENT}>"
    mail["To"] = PROSPECT
    mail["Subject"] = "Ihr Exposé"
    mail["Message-ID"] = message_id
    if mark is not None:
        mail[LOOP_HEADER] = mark
    mail.set_content("Guten Tag!\n")
    return mail.as_bytes(policy=email.policy.SMTP)


def marks_in(data: bytes) -> list[str]:
    return headers.values(headers.fields_of(data), LOOP_HEADER)


async def counts(relay: Harness) -> tuple[int, int, int]:
    """Messages, deliveries, and deliveries not yet delivered."""
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
        open_ = await session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.status != "delivered")
        )
    return messages or 0, deliveries or 0, open_ or 0


async def journal(relay: Harness, kind: str) -> list[Event]:
    async with relay.relay.db.transaction() as session:
        return list((await session.scalars(select(Event).where(Event.type == kind))).all())


async def test_correct_rule_the_internet_gets_one_marked_signed_copy(
    relay_factory: StartRelay,
    connector: ConnectorSimulator,
    connector_certificate: tuple[Authority, Issued],
    sink: Sink,
) -> None:
    relay = await start_relay(relay_factory, connector, connector_certificate[0])
    await connector.submit(AGENT, [PROSPECT], agent_mail())
    [copy] = await sink.expect(1)
    await connector.idle()
    assert [f.reply[:3] for f in connector.forwards] == ["250"]
    assert connector.bounces == [] and len(sink.messages) == 1
    assert copy.rcpt_tos == [PROSPECT]
    [mark] = marks_in(copy.data)
    assert mark.startswith("v=1; h=relay.broker.example; t=")
    assert [f.verdict for f in relay.relay.loop.judge(headers.fields_of(copy.data))] == ["loop"]
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))
    signature = headers.first_value(headers.fields_of(copy.data), "dkim-signature") or ""
    h_tag = "".join(signature.split()).split("h=")[1].split(";")[0].lower().split(":")
    assert h_tag.count("x-sealrelay-loop") == 2  # signed and oversigned
    await queue_idle(relay.relay.db)
    assert await counts(relay) == (1, 1, 0)


async def test_broken_rule_the_second_pass_is_refused_and_the_platform_bounces(
    relay_factory: StartRelay,
    connector: ConnectorSimulator,
    connector_certificate: tuple[Authority, Issued],
    sink: Sink,
) -> None:
    connector.rule = "everything"
    relay = await start_relay(relay_factory, connector, connector_certificate[0])
    await connector.submit(AGENT, [PROSPECT], agent_mail())
    await connector.wait_for(forwards=2, bounces=1)
    await connector.idle()
    first, second = connector.forwards
    assert first.reply.startswith("250 2.0.0 Ok: queued as")
    assert second.reply.startswith(f"{LOOP_REFUSAL} relay.broker.example and came back")
    assert "X-Sealrelay-Loop header" in second.reply
    [bounce] = connector.bounces
    assert bounce.to == AGENT and bounce.reason == second.reply
    assert len(connector.forwards) == 2 and sink.messages == []
    # one message, its one copy delivered (to the platform), nothing left to send
    await queue_idle(relay.relay.db)
    assert await counts(relay) == (1, 1, 0)
    assert len(await journal(relay, "message.received")) == 1


async def test_forged_marks_are_no_loop_and_are_removed_and_journaled(
    relay_factory: StartRelay,
    connector: ConnectorSimulator,
    connector_certificate: tuple[Authority, Issued],
    sink: Sink,
) -> None:
    relay = await start_relay(relay_factory, connector, connector_certificate[0])
    await connector.submit(AGENT, [PROSPECT], agent_mail("<genuine@broker.example>"))
    [genuine] = await sink.expect(1)
    [real_mark] = marks_in(genuine.data)
    relay_id = real_mark.split("id=")[1].split(";")[0]
    moment = int(datetime.now(UTC).timestamp())
    mac = real_mark.split("mac=")[1]
    other_key = LoopMarks(b"k" * 32, "relay.broker.example", timedelta(days=7))
    cases = {
        "<other-key@b.example>": marks_in(
            other_key.field(Message(id=relay_id, message_id_header="<other-key@b.example>"))
        )[0],
        "<altered-id@b.example>": real_mark.replace(f"id={relay_id}", "id=0000000000"),
        "<moved@b.example>": real_mark,  # a genuine mark, on another message
        "<malformed@b.example>": "this is not a mark",
        "<version@b.example>": f"v=9; h=relay.broker.example; t={moment}; id={relay_id}; mac={mac}",
    }
    for message_id, mark in cases.items():
        await connector.submit(AGENT, [PROSPECT], agent_mail(message_id, mark))
    copies = await sink.expect(1 + len(cases))
    await connector.idle()
    assert connector.bounces == []
    for copy in copies[1:]:
        [only] = marks_in(copy.data)  # the forged one is gone; ours is the one left
        assert only not in cases.values()
        assert [f.verdict for f in relay.relay.loop.judge(headers.fields_of(copy.data))] == ["loop"]
    events = await journal(relay, "message.loop_mark_forged")
    assert sorted(e.data["reason"] for e in events) == sorted(
        [
            "the mac does not verify (altered, moved, or another key)",
            "the mac does not verify (altered, moved, or another key)",
            "the mac does not verify (altered, moved, or another key)",
            "the field is not a list of tag=value pairs",
            "unknown version v='9'",
        ]
    )
    assert {e.data["relay"] for e in events} == {"relay.broker.example", ""}
    await queue_idle(relay.relay.db)
    assert await counts(relay) == (1 + len(cases), 1 + len(cases), 0)


async def test_the_mark_verifies_after_a_restart_and_at_a_second_relay_with_the_key(
    relay_factory: StartRelay,
    connector: ConnectorSimulator,
    connector_certificate: tuple[Authority, Issued],
    sink: Sink,
) -> None:
    ca = connector_certificate[0]
    first = await start_relay(relay_factory, connector, ca)
    key_file = first.settings.loop.key_file
    key = key_file.read_bytes()
    await connector.submit(AGENT, [PROSPECT], agent_mail("<before-restart@broker.example>"))
    [copy] = await sink.expect(1)
    await connector.idle()
    await first.relay.stop()

    restarted = await start_relay(relay_factory, connector, ca)
    assert key_file.read_bytes() == key  # read again, not made anew
    connector.rule = "everything"
    await connector.to_relay(AGENT, [PROSPECT], copy.data, "<before-restart@broker.example>")
    assert connector.forwards[-1].reply.startswith(f"{LOOP_REFUSAL} relay.broker.example")
    await restarted.relay.stop()

    second = await start_relay(relay_factory, connector, ca, server={"hostname": "relay2.example"})
    await connector.to_relay(AGENT, [PROSPECT], copy.data, "<before-restart@broker.example>")
    assert connector.forwards[-1].reply.startswith(f"{LOOP_REFUSAL} relay.broker.example")
    assert second.relay.loop.hostname == "relay2.example"
    await queue_idle(second.relay.db)
    assert await counts(second) == (1, 1, 0)


# -- the key file and the window, without connections


def test_the_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "loop.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["loop.key"]  # no temporary left


def test_relays_starting_at_once_end_up_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "loop.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(path), range(16)))
    assert keys == {load_or_create_key(path)}
    assert [p.name for p in tmp_path.iterdir()] == ["loop.key"]


def test_a_key_file_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    path = tmp_path / "not-a-directory" / "loop.key"
    with pytest.raises(
        LoopKeyError, match=f"loop.key_file {path}: cannot read it: .*Not a directory"
    ):
        load_or_create_key(path)


@pytest.mark.parametrize("content", ["", "short", "!!!not base64!!!", "c2hvcnQ="])
def test_a_bad_key_file_stops_start_up_naming_the_key(tmp_path: Path, content: str) -> None:
    path = tmp_path / "loop.key"
    path.write_text(content)
    with pytest.raises(LoopKeyError, match=f"loop.key_file {path}: not a loop key"):
        load_or_create_key(path)
    assert path.read_text() == content  # never replaced behind the admin's back
    settings = Settings.model_validate({"loop": {"key_file": str(path)}})
    problems = [p for p in settings_problems(settings) if p.key == "loop.key_file"]
    assert [p.text.split(" (")[0] for p in problems] == ["not a loop key"]


def test_max_age_days_is_validated() -> None:
    with pytest.raises(ValueError, match="max_age_days"):
        Settings.model_validate({"loop": {"max_age_days": 0}})


def test_an_old_mark_of_ours_is_ignored_not_refused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "loop.key")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    clock = [now]
    marks = LoopMarks(key, "relay.broker.example", timedelta(days=7), lambda: clock[0])
    message = Message(id="0123abcd", message_id_header="<m@broker.example>")
    data = marks.field(message) + b"Message-ID: <m@broker.example>\r\n\r\nbody\r\n"
    clock[0] = now + timedelta(days=6, hours=23)
    assert [f.verdict for f in marks.judge(headers.fields_of(data))] == ["loop"]
    clock[0] = now + timedelta(days=7, seconds=1)
    assert [(f.verdict, f.reason) for f in marks.judge(headers.fields_of(data))] == [
        ("expired", "made 7 days ago")
    ]
    folded = data.replace(b"Message-ID: <m@broker.example>", b"Message-ID:\r\n <m@broker.example>")
    clock[0] = now
    assert [f.verdict for f in marks.judge(headers.fields_of(folded))] == ["loop"]


async def test_an_agent_resending_a_fresh_copy_is_refused_and_an_old_one_taken(
    relay_factory: StartRelay, sink: Sink
) -> None:
    relay = await relay_factory()
    key = load_or_create_key(relay.settings.loop.key_file)
    now = datetime.now(UTC)

    def marked(message_id: str, age: timedelta) -> bytes:
        marks = LoopMarks(key, "relay.broker.example", timedelta(days=7), lambda: now - age)
        mark = marks_in(marks.field(Message(id="0a1b2c3d", message_id_header=message_id)))[0]
        return agent_mail(message_id, mark)

    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        fresh = marked("<fresh@broker.example>", timedelta(minutes=1))
        await relay.send(fresh, recipients=[PROSPECT])
    assert refused.value.code == 554
    assert refused.value.message.startswith(
        "5.4.6 Routing loop detected: this message was already relayed by relay.broker.example"
    )
    assert await counts(relay) == (0, 0, 0)

    await relay.send(marked("<old@broker.example>", timedelta(days=8)), recipients=[PROSPECT])
    [copy] = await sink.expect(1)
    [mark] = marks_in(copy.data)
    assert "id=0a1b2c3d" not in mark  # the old mark is gone, the copy carries a new one
    assert await journal(relay, "message.loop_mark_forged") == []  # ours, only too old
    await queue_idle(relay.relay.db)
    assert await counts(relay) == (1, 1, 0)
