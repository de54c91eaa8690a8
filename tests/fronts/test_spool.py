"""DATA spooled to a nameless file while it arrives (gateway/fronts/data_reader.py), through
the real front: the file is open in the configured spool directory during DATA, and closed
after a 250, a 552, a 500 and a client gone mid-DATA, with nothing left in the directory."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.fronts import data_reader
from gateway.fronts.data_reader import KEPT, WINDOW
from gateway.fronts.smtp import spool_directory
from tests.conftest import AGENT, Harness, StartRelay
from tests.fronts.test_smtp_front import (
    PROSPECT,
    Wire,
    assert_nothing_written,
    dotted,
    plain_token,
    raw_message,
    send_sentinel,
)

PAST_KEPT = KEPT + WINDOW + 100_000  # a read takes a piece of at most WINDOW octets


def spool_files(spool: Path) -> list[str]:
    """This process's open files in `spool` (the front runs in the test's process)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(f"{spool}/"):
            found.append(target)
    return found


async def until(condition: Callable[[], bool], what: str) -> None:
    """Polls the process's file table (there is no event to await), bounded."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within 10 s: {what}")


@pytest.fixture
async def spooling(relay_factory: StartRelay, tmp_path: Path) -> tuple[Harness, Path]:
    spool = tmp_path / "own-spool"
    return await relay_factory(smtp={"spool_dir": str(spool)}), spool


async def logged_in(relay: Harness) -> Wire:
    wire = await Wire.open(relay.smtp_port)
    await wire.ehlo()
    await wire.starttls()
    await wire.ehlo()
    assert (await wire.command(f"AUTH PLAIN {plain_token()}")).code == 235
    assert (await wire.command(f"MAIL FROM:<{AGENT}>")).code == 250
    assert (await wire.command(f"RCPT TO:<{PROSPECT}>")).code == 250
    return wire


def line_block(octets: int) -> bytes:
    line = b"x" * 78 + b"\r\n"
    return line * (octets // len(line))


async def test_the_message_is_in_the_spool_file_while_it_arrives(
    spooling: tuple[Harness, Path],
) -> None:
    relay, spool = spooling
    assert spool.is_dir() and list(spool.iterdir()) == []
    wire = await logged_in(relay)
    payload = dotted(raw_message(body=line_block(900_000)))
    assert (await wire.command("DATA")).code == 354
    # past what stays in memory
    await wire.write(payload[:PAST_KEPT])
    await until(lambda: len(spool_files(spool)) == 1, "a spool file open during DATA")
    await wire.write(payload[PAST_KEPT:])
    answer = await wire.answer()
    assert answer.code == 250, answer
    assert spool_files(spool) == [] and list(spool.iterdir()) == []
    [copy] = await relay.sink.expect(1)
    assert line_block(900_000) in copy.data
    await wire.close()


@pytest.mark.parametrize(
    ("body", "code"),
    [(line_block(1024 * 1024 + 1000), 552), (b"y" * 1200 + b"\r\n", 500)],
    ids=["over the size limit", "line too long"],
)
async def test_a_refused_message_leaves_no_spool_file(
    spooling: tuple[Harness, Path], body: bytes, code: int
) -> None:
    relay, spool = spooling
    wire = await logged_in(relay)
    answer = await wire.data(dotted(raw_message(body=body)))
    assert answer.code == code, answer
    assert spool_files(spool) == [] and list(spool.iterdir()) == []
    await assert_nothing_written(relay)
    await send_sentinel(relay, wire)
    assert spool_files(spool) == []
    await wire.close()


async def test_a_spool_that_cannot_be_written_is_answered_451_after_the_data(
    spooling: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the spool: the client hears 451 once its data has ended (not while
    it still sends), the session stays in step, and nothing is stored or left behind."""
    relay, spool = spooling

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_reader, "_write_out", full)
    wire = await logged_in(relay)
    answer = await wire.data(dotted(raw_message(body=line_block(900_000))))
    assert answer.code == 451, answer
    assert spool_files(spool) == [] and list(spool.iterdir()) == []
    await assert_nothing_written(relay)
    monkeypatch.undo()
    await send_sentinel(relay, wire)


def unreadable(*args: object) -> bytes:
    raise OSError(errno.EIO, "Input/output error")


async def test_a_spool_that_cannot_be_read_back_ends_the_transaction(
    spooling: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message is answered 451 and its transaction is over: the next MAIL starts one."""
    relay, spool = spooling
    monkeypatch.setattr(data_reader, "_read_back", unreadable)
    wire = await logged_in(relay)
    answer = await wire.data(dotted(raw_message(body=line_block(900_000))))
    assert answer.code == 451, answer
    assert spool_files(spool) == []
    await assert_nothing_written(relay)
    monkeypatch.undo()
    await send_sentinel(relay, wire)


async def test_a_client_silent_after_a_failed_message_is_timed_out(
    relay_factory: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timer, resting while the relay worked on the message, runs again after
    the 451: a client that then says nothing does not keep its place for ever. (5 s: under
    the full suite's load a login's commands alone once took more than 2.)"""
    relay = await relay_factory(smtp={"spool_dir": str(tmp_path / "spool"), "timeout": 5})
    monkeypatch.setattr(data_reader, "_read_back", unreadable)
    wire = await logged_in(relay)
    answer = await wire.data(dotted(raw_message(body=line_block(900_000))))
    assert answer.code == 451, answer
    timed_out = await asyncio.wait_for(wire.answer(), 15)
    assert timed_out.code == 421, timed_out
    await wire.close()


async def test_a_client_gone_mid_data_leaves_no_spool_file(
    spooling: tuple[Harness, Path],
) -> None:
    relay, spool = spooling
    wire = await logged_in(relay)
    assert (await wire.command("DATA")).code == 354
    await wire.write(raw_message(body=line_block(PAST_KEPT + 100_000))[:PAST_KEPT])
    await until(lambda: len(spool_files(spool)) == 1, "a spool file open during DATA")
    await wire.close()
    await until(lambda: spool_files(spool) == [], "the spool file closed")
    assert list(spool.iterdir()) == []
    await assert_nothing_written(relay)


def spool_inodes(spool: Path) -> list[int]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{spool}/"):
                found.append(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            continue
    return found


async def test_a_big_message_s_spool_file_becomes_its_stored_original(
    spooling: tuple[Harness, Path],
) -> None:
    """Not written to the disk twice: the blob store names the spool file (same inode), and
    the stored original is the message as received, byte for byte."""
    relay, spool = spooling
    wire = await logged_in(relay)
    raw = raw_message(body=line_block(900_000))
    payload = dotted(raw)
    assert (await wire.command("DATA")).code == 354
    await wire.write(payload[:PAST_KEPT])
    await until(lambda: len(spool_inodes(spool)) == 1, "a spool file open during DATA")
    [inode] = spool_inodes(spool)
    await wire.write(payload[PAST_KEPT:])
    answer = await wire.answer()
    assert answer.code == 250, answer
    stored = Path(relay.relay.blobs.location(hashlib.sha256(raw).hexdigest()))
    assert stored.read_bytes() == raw
    assert stored.stat().st_ino == inode
    assert list(spool.iterdir()) == []
    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(raw[raw.index(b"\r\n\r\n") :])
    await wire.close()


def test_the_spool_is_beside_the_blobs_unless_configured() -> None:
    settings = Settings.model_validate({"storage": {"path": "/srv/relay/blobs"}})
    assert spool_directory(settings) == Path("/srv/relay/spool")
    settings = Settings.model_validate({"smtp": {"spool_dir": "/var/spool/sealrelay"}})
    assert spool_directory(settings) == Path("/var/spool/sealrelay")
