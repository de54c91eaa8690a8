"""10 MB messages through the real front (aiosmtpd) from the standard library's smtplib,
into the recording sink: accepted whole, signed so that dkimpy verifies what arrived, and
the refusals (a line over the limit, a bare LF) leave nothing behind."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

import dkim as dkimpy
import pytest

from tests.conftest import AGENT, PASSWORD, Harness, StartRelay, dkim_dns
from tests.fronts.test_smtp_front import PROSPECT, assert_nothing_written, raw_message

MIB = 1024 * 1024
LIMIT = 12 * MIB


@pytest.fixture
async def big_relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory(smtp={"max_message_size": LIMIT})


def big_text(size: int, mark: str) -> bytes:
    """A plain text body of about `size` octets with everything canonicalization and
    dot-stuffing care about: lines starting with dots, runs of spaces and tabs, white
    space at line ends, a line of exactly 998 octets, empty lines at the end."""
    lines = [
        f"{mark} line {{}} of the big mail, with  two spaces".encode(),
        b".a line starting with a dot",
        b"..two dots, and a tab\there, and white space at the end \t ",
        b"x" * 998,
        b"",
        b"plain text " * 8,
    ]
    out, count = [], 0
    while count < size:
        for line in lines:
            piece = line.replace(b"{}", str(count).encode()) + b"\r\n"
            out.append(piece)
            count += len(piece)
    return b"".join(out) + b"\r\n \r\n\r\n"


def client(relay: Harness) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60)
    smtp.ehlo("client.broker.example")
    smtp.starttls(context=ssl._create_unverified_context())  # the test's own certificate
    smtp.ehlo("client.broker.example")
    smtp.login(AGENT, PASSWORD)
    return smtp


def send_big(relay: Harness, raw: bytes) -> tuple[int, bytes]:
    with client(relay) as smtp:
        smtp.mail(AGENT)
        smtp.rcpt(PROSPECT)
        return smtp.data(raw)


def data_as_is(relay: Harness, wire: bytes) -> tuple[int, bytes]:
    """DATA with `wire` sent byte for byte (smtplib's data() would fix line ends)."""
    with client(relay) as smtp:
        smtp.mail(AGENT)
        smtp.rcpt(PROSPECT)
        code, _ = smtp.docmd("DATA")
        assert code == 354
        smtp.send(wire)
        return smtp.getreply()


async def test_two_10_mb_messages_at_once_arrive_whole_and_verify(big_relay: Harness) -> None:
    messages = [
        raw_message(extra=(f"Message-ID: <big-{n}@broker.example>",), body=big_text(10 * MIB, n))
        for n in ("one", "two")
    ]
    replies = await asyncio.gather(
        *(asyncio.to_thread(send_big, big_relay, raw) for raw in messages)
    )
    assert [code for code, _ in replies] == [250, 250], replies
    copies = await big_relay.sink.expect(2)
    by_id = {copy.data.split(b"Message-ID: ", 1)[1][:20]: copy.data for copy in copies}
    for n, raw in zip(("one", "two"), messages, strict=True):
        data = by_id[f"<big-{n}@broker.example>".encode()[:20]]
        assert data.endswith(raw)  # every byte the agent wrote, after our fields
        assert data.startswith(b"DKIM-Signature:")
        assert dkimpy.verify(data, dnsfunc=dkim_dns(big_relay.dkim_key))


async def test_a_line_over_the_limit_is_refused_and_nothing_is_kept(
    big_relay: Harness, tmp_path: Path
) -> None:
    over = b"y" * 1000 + b"\r\n"  # aiosmtpd's limit, 1001 octets, and one more
    body = big_text(3 * MIB, "long") + over + big_text(MIB, "after")
    code, text = await asyncio.to_thread(send_big, big_relay, raw_message(body=body))
    assert (code, text[:9]) == (500, b"5.5.6 Lin"), text
    await assert_nothing_written(big_relay)
    assert not [path for path in (tmp_path / "blobs").rglob("*") if path.is_file()]


@pytest.mark.parametrize("bare", [b"\n", b"\r"])
async def test_a_bare_line_end_deep_in_a_big_message_is_refused(
    big_relay: Harness, tmp_path: Path, bare: bytes
) -> None:
    body = big_text(5 * MIB, "bare") + b"then a bare line end" + bare + b"here\r\n"
    wire = raw_message(body=body).replace(b"\r\n.", b"\r\n..") + b".\r\n"
    code, text = await asyncio.to_thread(data_as_is, big_relay, wire)
    assert (code, text[:5]) == (550, b"5.6.0"), text
    assert b"bare CR or LF" in text
    await assert_nothing_written(big_relay)
    assert not [path for path in (tmp_path / "blobs").rglob("*") if path.is_file()]
