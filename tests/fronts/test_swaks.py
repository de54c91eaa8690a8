"""The relay as a stock command-line client sees it: swaks, the Swiss Army Knife for SMTP.

swaks is required, not optional: when it is missing these tests fail (`.ci/run` installs it).
It runs as a subprocess while the relay keeps serving in this event loop; every wait is
bounded.
"""

from __future__ import annotations

import shutil

import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway.mail import headers
from gateway.store.models import Delivery, Message
from tests.conftest import AGENT, PASSWORD, Harness, dkim_dns
from tests.support import run_process

pytestmark = pytest.mark.slow

TIMEOUT = 60
PROSPECT = "prospect@example.com"


@pytest.fixture(scope="session")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        pytest.fail(
            "swaks is not installed, and these tests need it: apt-get install -y swaks"
            " (.ci/run installs it)",
            pytrace=False,
        )
    return path


async def run(swaks: str, *args: str) -> tuple[int, str]:
    """swaks' exit status and transcript (stdout and stderr together)."""
    return await run_process(swaks, *args, timeout=TIMEOUT)


def common(port: int, subject: str) -> list[str]:
    return [
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "swaks.client.example",
        "--from",
        AGENT,
        "--to",
        PROSPECT,
        "--header",
        f"Subject: {subject}",
        "--body",
        "Guten Tag, hier ist das Exposé.",
        "--timeout",
        "20",
    ]


def credentials(password: str = PASSWORD) -> list[str]:
    return ["--auth", "PLAIN", "--auth-user", AGENT, "--auth-password", password]


async def stored(relay: Harness) -> tuple[int, int]:
    async with relay.relay.db.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    return messages or 0, deliveries or 0


async def test_swaks_sends_over_starttls_and_implicit_tls(relay: Harness, swaks: str) -> None:
    status, transcript = await run(
        swaks, *common(relay.smtp_port, "via STARTTLS"), "--tls", *credentials()
    )
    assert status == 0, transcript
    assert "<~  235 2.7.0 Authentication successful" in transcript
    assert "<~  250 2.0.0 Ok: queued as " in transcript

    status, transcript = await run(
        swaks, *common(relay.tls_port, "via implicit TLS"), "--tls-on-connect", *credentials()
    )
    assert status == 0, transcript
    assert "<~  250 2.0.0 Ok: queued as " in transcript

    copies = await relay.sink.expect(2)
    assert len(copies) == 2
    assert {headers.first_value(headers.fields_of(c.data), "subject") for c in copies} == {
        "via STARTTLS",
        "via implicit TLS",
    }
    for copy in copies:
        assert copy.mail_from == AGENT and copy.rcpt_tos == [PROSPECT]
        fields = headers.fields_of(copy.data)
        assert fields[0].name == "dkim-signature"
        assert fields[1].name == "received" and "with ESMTPSA" in fields[1].value
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))


async def test_swaks_cannot_log_in_without_tls(relay: Harness, swaks: str) -> None:
    status, transcript = await run(swaks, *common(relay.smtp_port, "plaintext"), *credentials())
    # AUTH is not offered before STARTTLS, so swaks gives up before sending the password
    # (exit status 28: authentication failed); the raw 530 is in test_smtp_front.py.
    assert status == 28, transcript
    assert "<-  250-STARTTLS" in transcript
    assert "*** Host did not advertise authentication" in transcript
    assert "-> AUTH" not in transcript, "the password must never be sent in the clear"
    assert "<-  235" not in transcript  # a reply, not a port number that holds the digits
    assert "-> DATA" not in transcript
    assert await stored(relay) == (0, 0)
    assert relay.sink.messages == []


async def test_swaks_with_a_wrong_password_gets_535(relay: Harness, swaks: str) -> None:
    status, transcript = await run(
        swaks,
        *common(relay.smtp_port, "wrong password"),
        "--tls",
        *credentials("not the password"),
    )
    assert status != 0, transcript
    assert "535 5.7.8 Authentication failed: wrong login or password" in transcript
    assert "-> DATA" not in transcript
    assert await stored(relay) == (0, 0)
    assert relay.sink.messages == []


async def test_swaks_pipelines_its_envelope_and_a_refused_recipient_keeps_its_place(
    relay: Harness, swaks: str
) -> None:
    """swaks sends MAIL, both RCPTs and DATA in one write once EHLO offers PIPELINING; the
    replies come back in the commands' order, the refused recipient's 553 in its place, and
    the message goes to the other one alone."""
    bad = "bad..dots@example.com"
    status, transcript = await run(
        swaks,
        *common(relay.smtp_port, "pipelined"),
        "--to",
        f"{PROSPECT},{bad}",
        "--pipeline",
        "--tls",
        *credentials(),
    )
    assert status == 0, transcript  # swaks: sent, to at least one recipient
    assert "<~  250-PIPELINING" in transcript
    lines = transcript.splitlines()
    sent = [line.strip() for line in lines if line.startswith(" ~> ")]
    got = [line[4:].strip() for line in lines if line.startswith(("<~ ", "<~*"))]
    mail = sent.index(f"~> MAIL FROM:<{AGENT}>")
    assert sent[mail + 1 : mail + 4] == [
        f"~> RCPT TO:<{PROSPECT}>",
        f"~> RCPT TO:<{bad}>",
        "~> DATA",
    ]
    start = got.index("250 2.1.0 Ok", got.index("235 2.7.0 Authentication successful"))
    assert got[start + 1] == "250 2.1.5 Ok", got
    assert got[start + 2].startswith(f"553 5.1.3 The recipient address <{bad}> is not valid"), got
    assert got[start + 3].startswith("354 "), got
    assert got[start + 4].startswith("250 2.0.0 Ok: queued as "), got
    [copy] = await relay.sink.expect(1)
    assert copy.rcpt_tos == [PROSPECT]
    assert await stored(relay) == (1, 1)
