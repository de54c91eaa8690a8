"""The upstream code against a real Postfix smtpd, which offers PIPELINING and CHUNKING
(Postfix 3.4 and later), as the re-injection port of docs/postfix.md and many smart hosts do.

A small copy's `BDAT <size> LAST` chunk leaves in one write with MAIL and RCPT. The test
sink in test_chunking.py was written to RFC 3030; this is the receiver that runs in the field:
it must read a chunk sent for nobody, refuse it and keep nothing, and then go on with the
next transaction on the same connection, with no complaint of improper pipelining.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.config import UpstreamSettings
from gateway.outbound.upstream import Outcome, SmtpUpstream
from tests.postfix_instance import PostfixInstance, postfix_instance
from tests.support import Sink

pytestmark = pytest.mark.slow

SENDER = "agent@broker.example"
DATA = b"From: agent@broker.example\r\nSubject: zwei\r\n\r\n.Punkt am Zeilenanfang\r\nEnde\r\n"
BODY = DATA.split(b"\r\n\r\n", 1)[1]
REFUSED = "smtpd_recipient_restrictions = check_recipient_access inline:{gone@example.com=REJECT}"


@asynccontextmanager
async def postfix_to(sink: Sink, directory: Path, setting: str) -> AsyncIterator[PostfixInstance]:
    """A Postfix relaying to `sink`, with one main.cf `setting` of the test's."""
    async with postfix_instance(
        directory, relayhost=f"[127.0.0.1]:{sink.port}", main_cf=[setting]
    ) as instance:
        yield instance


async def two_copies(
    postfix: PostfixInstance, first: Sequence[str], second: Sequence[str], big: bytes = DATA
) -> tuple[dict[str, Outcome], dict[str, Outcome]]:
    """`big` to `first`, then DATA to `second`, one connection kept for both."""
    settings = UpstreamSettings(url=f"smtp://127.0.0.1:{postfix.smtpd_port}", timeout=10)
    upstream = SmtpUpstream(settings, "relay.broker.example")
    try:
        return (
            await upstream.send(SENDER, list(first), big),
            await upstream.send(SENDER, list(second), DATA),
        )
    finally:
        await upstream.close()


async def commands_counted(postfix: PostfixInstance) -> list[str]:
    """The counts Postfix logs for the one connection (the other is the instance's own
    check that smtpd listens), once its queue is empty; never a complaint of pipelining."""
    await postfix.wait_queue_empty()
    log = postfix.log()
    assert "improper command pipelining" not in log
    [counts] = re.findall(r"disconnect from \S+ (ehlo=.*)", log)
    return counts.split()[:5]


async def test_postfix_reads_a_chunk_for_nobody_and_takes_the_next_on_one_connection(
    tmp_path: Path, sink: Sink
) -> None:
    async with postfix_to(sink, tmp_path, REFUSED) as postfix:
        nobody, some = await two_copies(
            postfix, ["gone@example.com"], ["p@example.com", "gone@example.com"]
        )
        [copy] = await sink.expect(1)
        counts = await commands_counted(postfix)
    [refused] = nobody.values()
    assert refused.permanent and (refused.error or "").startswith("554 5.7.1 <gone@example.com>")
    assert some["p@example.com"].delivered and some["gone@example.com"].permanent
    assert copy.rcpt_tos == ["p@example.com"]
    assert copy.data.endswith(BODY)  # the line's dot came as it was
    assert counts == ["ehlo=1", "mail=2", "rcpt=1/3", "bdat=1/2", "rset=1"]


async def test_postfix_reads_a_chunk_whose_mail_it_refused_for_its_size(
    tmp_path: Path, sink: Sink
) -> None:
    """MAIL refused at once (SIZE over `message_size_limit`): RCPT and BDAT are refused too,
    the chunk is read past, and the next, smaller copy goes on the same connection."""
    too_big = DATA + b"x" * 2000 + b"\r\n"
    async with postfix_to(sink, tmp_path, "message_size_limit = 1500") as postfix:
        first, second = await two_copies(postfix, ["p@example.com"], ["p@example.com"], too_big)
        [copy] = await sink.expect(1)
        counts = await commands_counted(postfix)
    [refused], [taken] = first.values(), second.values()
    assert refused.permanent and (refused.error or "").startswith("552 5.3.4")
    assert taken.delivered and copy.data.endswith(BODY)
    assert counts == ["ehlo=1", "mail=1/2", "rcpt=1/2", "bdat=1/2", "rset=1"]
