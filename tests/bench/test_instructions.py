"""bench/instructions.py: the stages it counts run the relay's own code on its messages, and a
missing valgrind is said, with its package, in exit status 2 (never a figure made up).

Counting under callgrind takes a minute a stage, so the suite runs the stages without it."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest

from bench import instructions
from bench.front import listener


@pytest.mark.parametrize("stage", instructions.STAGES)
def test_each_stage_runs_the_relays_code_on_new_messages(stage: str) -> None:
    instructions.run_stage(stage, 3)


def test_the_copy_stage_signs_what_leaves() -> None:
    """The copy it counts is the one delivery would send: signed, trace field on top."""
    raw = instructions.messages(1)[0]
    copy = instructions.copier()(raw)
    assert copy.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b"\r\nReceived: from client.bench.example (127.0.0.1) by relay.bench.example" in copy
    assert copy.endswith(raw)


def test_the_commit_stage_delivers_and_chains_what_it_takes(tmp_path: Path) -> None:
    """The writes it counts are a message's whole life in the database: taken with its blob
    and events, claimed, held, delivered, every event numbered and chained."""
    commit = instructions.committer(tmp_path)
    found = instructions.messages(2 * instructions.BATCH_OF)
    batches = [found[: instructions.BATCH_OF], found[instructions.BATCH_OF :]]
    for batch in batches:
        commit([(raw, hashlib.sha256(raw).hexdigest()) for raw in batch])
    database = sqlite3.connect(tmp_path / "commit.db")
    try:
        count = len(found)
        assert database.execute(
            "SELECT status, count(*) FROM deliveries GROUP BY status"
        ).fetchall() == [("delivered", count)]
        assert database.execute("SELECT count(*) FROM inline_blobs").fetchone() == (count,)
        assert database.execute(
            "SELECT type, count(*), count(seq) FROM events GROUP BY type ORDER BY type"
        ).fetchall() == [
            ("delivery.delivered", count, count),
            ("delivery.queued", count, count),
            ("message.received", count, count),
        ]
        assert database.execute("SELECT seq FROM journal_head").fetchone() == (3 * count,)
    finally:
        database.close()


def test_a_missing_valgrind_is_named_with_its_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exited:
        instructions.main(["--stages", "intake", "--messages", "2"])
    assert exited.value.code == 2
    assert "valgrind is missing: apt-get install -y valgrind" in capsys.readouterr().err


def test_an_unknown_stage_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        instructions.parse(["--stages", "intake,deliver"])
    assert exited.value.code == 2
    assert "--stages: unknown deliver" in capsys.readouterr().err


def test_the_front_stage_holds_a_whole_session_with_the_front() -> None:
    """Each step of the counted conversation got the reply a client would: the front took
    the message and said goodbye, or the stage would have stopped."""
    raw = instructions.messages(1)[0]
    steps = instructions.conversation(raw)
    assert [code for _, code in steps] == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert steps[5][0].endswith(b"\r\n.\r\n")
    asyncio.run(instructions.session(listener(), steps))


def test_a_front_that_refuses_a_step_stops_the_stage_with_its_reply() -> None:
    steps = instructions.conversation(instructions.messages(1)[0])
    steps[3] = (b"RCPT prospect@sink.example\r\n", b"250")
    with pytest.raises(SystemExit) as stopped:
        asyncio.run(instructions.session(listener(), steps))
    assert "the front answered b'5" in str(stopped.value)
    assert "RCPT prospect@sink.example" in str(stopped.value)


def test_the_send_stage_sends_each_copy_pipelined_over_the_kept_connection() -> None:
    """One write a copy (MAIL, RCPT and the BDAT chunk together), all over the connection
    kept: no new connection is opened, which here would fail."""
    found = instructions.messages(4)
    upstream, connection, host = instructions.smart_host_upstream(len(found))

    async def run() -> None:
        await instructions.first_send(upstream, connection, found[0])
        await instructions.sends(upstream, found[1:])

    asyncio.run(run())
    assert host.copies == len(found)
    assert connection.messages == len(found)


def test_a_copy_the_smart_host_refuses_stops_the_stage_with_the_outcome() -> None:
    found = instructions.messages(2)
    upstream, connection, host = instructions.smart_host_upstream(len(found))
    host.REPLIES = b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n554 5.5.1 No valid recipients\r\n"
    with pytest.raises(SystemExit) as stopped:
        asyncio.run(instructions.first_send(upstream, connection, found[0]))
    assert "a copy was not delivered" in str(stopped.value)
    assert "550 5.1.1 No such user" in str(stopped.value)
