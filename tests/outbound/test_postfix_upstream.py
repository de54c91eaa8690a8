"""The upstream code against a real Postfix smtpd, which offers PIPELINING and CHUNKING
(Postfix 3.4 and later), as the re-injection port of docs/postfix.md and many smart hosts do.

A small copy's `BDAT <size> LAST` chunk leaves in one write with MAIL and RCPT. The test
sink in test_chunking.py was written to RFC 3030; this is the receiver that runs in the field:
it must read a chunk sent for nobody, refuse it and keep nothing, and then go on with the
next transaction on the same connection, with no complaint of improper pipelining.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import UpstreamSettings
from gateway.outbound.upstream import SmtpUpstream
from tests.postfix_instance import PostfixInstance, postfix_instance
from tests.support import Sink

pytestmark = pytest.mark.slow

SENDER = "agent@broker.example"
DATA = b"From: agent@broker.example\r\nSubject: zwei\r\n\r\n.Punkt am Zeilenanfang\r\nEnde\r\n"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = await Sink().start()
    yield server
    await server.stop()


@pytest.fixture
async def postfix(tmp_path: Path, sink: Sink) -> AsyncIterator[PostfixInstance]:
    refused = (
        "smtpd_recipient_restrictions = check_recipient_access inline:{gone@example.com=REJECT}"
    )
    async with postfix_instance(
        tmp_path, relayhost=f"[127.0.0.1]:{sink.port}", main_cf=[refused]
    ) as instance:
        yield instance


async def test_postfix_reads_a_chunk_for_nobody_and_takes_the_next_on_one_connection(
    postfix: PostfixInstance, sink: Sink
) -> None:
    settings = UpstreamSettings(url=f"smtp://127.0.0.1:{postfix.smtpd_port}", timeout=10)
    upstream = SmtpUpstream(settings, "relay.broker.example")
    try:
        [nobody] = (await upstream.send(SENDER, ["gone@example.com"], DATA)).values()
        some = await upstream.send(SENDER, ["p@example.com", "gone@example.com"], DATA)
    finally:
        await upstream.close()
    assert nobody.permanent and (nobody.error or "").startswith("554 5.7.1 <gone@example.com>")
    assert some["p@example.com"].delivered and some["gone@example.com"].permanent
    [copy] = await sink.expect(1)
    assert copy.rcpt_tos == ["p@example.com"]
    assert copy.data.endswith(DATA.split(b"\r\n\r\n", 1)[1])  # the line's dot came as it was
    await postfix.wait_queue_empty()
    log = postfix.log()
    assert "improper command pipelining" not in log
    # one connection for both (the other is the instance's own check that smtpd listens)
    [counts] = re.findall(r"disconnect from \S+ (ehlo=.*)", log)
    assert counts.split()[:5] == ["ehlo=1", "mail=2", "rcpt=1/3", "bdat=1/2", "rset=1"]


async def test_postfix_reads_a_chunk_whose_mail_it_refused_for_its_size(
    tmp_path: Path, sink: Sink
) -> None:
    """MAIL refused at once (SIZE over `message_size_limit`): RCPT and BDAT are refused too,
    the chunk is read past, and the next, smaller copy goes on the same connection."""
    too_big = DATA + b"x" * 2000 + b"\r\n"
    async with postfix_instance(
        tmp_path, relayhost=f"[127.0.0.1]:{sink.port}", main_cf=["message_size_limit = 1500"]
    ) as postfix:
        settings = UpstreamSettings(url=f"smtp://127.0.0.1:{postfix.smtpd_port}", timeout=10)
        upstream = SmtpUpstream(settings, "relay.broker.example")
        try:
            [refused] = (await upstream.send(SENDER, ["p@example.com"], too_big)).values()
            [taken] = (await upstream.send(SENDER, ["p@example.com"], DATA)).values()
        finally:
            await upstream.close()
        [copy] = await sink.expect(1)
        await postfix.wait_queue_empty()
        log = postfix.log()
    assert refused.permanent and (refused.error or "").startswith("552 5.3.4")
    assert taken.delivered and copy.data.endswith(DATA.split(b"\r\n\r\n", 1)[1])
    assert "improper command pipelining" not in log
    [counts] = re.findall(r"disconnect from \S+ (ehlo=.*)", log)
    assert counts.split()[:5] == ["ehlo=1", "mail=1/2", "rcpt=1/2", "bdat=1/2", "rset=1"]
