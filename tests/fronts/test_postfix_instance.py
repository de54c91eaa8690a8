"""The private Postfix harness itself: it relays to its relayhost, queues while that is down,
and leaves nothing running when it stops."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from tests.postfix_instance import delay_reasons, postfix_command, postfix_instance
from tests.support import Sink, free_port

pytestmark = pytest.mark.slow


def note(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "someone@sender.example"
    message["To"] = "x@elsewhere.example"
    message["Subject"] = subject
    message.set_content("Hallo.\n")
    return message


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_relays_queues_while_relayhost_is_down_and_stops_cleanly(tmp_path: Path) -> None:
    sink = Sink(port=free_port())
    async with postfix_instance(tmp_path, relayhost=f"[127.0.0.1]:{sink.port}") as postfix:
        await aiosmtplib.send(note("first"), hostname="127.0.0.1", port=postfix.smtpd_port)
        deferred = await postfix.wait_deferred()  # nobody listens on the relayhost yet
        assert len(deferred) == 1, f"{deferred}\n{postfix.log()}"
        queued = deferred[0]
        assert queued["sender"] == "someone@sender.example"
        [reason] = delay_reasons(queued)
        assert f"127.0.0.1[127.0.0.1]:{sink.port}: Connection refused" in reason
        await sink.start()
        try:
            await postfix.flush()
            (received,) = await sink.expect(1)
            await postfix.wait_queue_empty()
            assert received.rcpt_tos == ["x@elsewhere.example"]
            assert b"Subject: first" in received.data
            assert f"by {postfix.hostname} (Postfix)".encode() in received.data
        finally:
            await sink.stop()
        master = postfix._master
        assert master is not None
    assert master.returncode is not None
    assert await refused(postfix.smtpd_port)
    assert "status=sent" in postfix.log()


def test_a_missing_postfix_command_fails_the_test_instead_of_skipping() -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y postfix"):
        postfix_command("postfix-command-that-does-not-exist")
