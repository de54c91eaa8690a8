"""bench/compare.py's signing Postfix (`--postfix-dkim`) signs what it relays as sealrelay
does, and refuses mail for now rather than relay it unsigned when its milter is gone: the
figures it gives are those of a Postfix that signs every message.

A missing Postfix or OpenDKIM makes these tests fail, not skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import aiosmtplib
import dkim as dkimpy
import pytest

from bench.compare import Server, start_postfix
from bench.harness import AGENT, DOMAIN, RECIPIENT
from tests.conftest import dkim_dns
from tests.opendkim_core import OpenDkim
from tests.support import Sink

pytestmark = pytest.mark.slow


async def send_through(postfix: Server, subject: str) -> None:
    message = (
        f"From: Anna Agent <{AGENT}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n"
        "Message-ID: <compare-dkim@demo.sealrelay.example>\r\n\r\nHello\r\n"
    ).encode()
    await aiosmtplib.send(
        message, sender=AGENT, recipients=[RECIPIENT], hostname="127.0.0.1", port=postfix.port
    )


async def test_the_signing_postfix_signs_what_it_relays(sink: Sink, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        postfix = await start_postfix(tmp_path, sink.port, stack, signed=True)
        assert postfix.name == "postfix-opendkim" and len(postfix.helpers) == 1
        await send_through(postfix, "signed")
        [copy] = await sink.expect(1, timeout=60)
    lookup = dkim_dns(OpenDkim(tmp_path / "opendkim", DOMAIN).signing_key())
    assert copy.data.startswith(b"DKIM-Signature:"), copy.data[:400]
    assert f"d={DOMAIN};".encode() in copy.data.split(b"\r\n\r\n", 1)[0]
    assert dkimpy.verify(copy.data, dnsfunc=lookup)
    assert not dkimpy.verify(copy.data.replace(b"Hello", b"Hallo"), dnsfunc=lookup)


async def test_without_its_milter_the_signing_postfix_refuses_for_now(
    sink: Sink, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        postfix = await start_postfix(tmp_path, sink.port, stack, signed=True)
        os.kill(postfix.helpers[0], signal.SIGKILL)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send_through(postfix, "unsigned")
    assert 400 <= refused.value.code < 500, refused.value
    assert sink.messages == []
