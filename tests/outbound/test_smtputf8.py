"""UTF-8 addresses (SMTPUTF8, RFC 6531) from an agent's client to the upstream.

A real relay, aiosmtplib asking for SMTPUTF8 as any client does for such an address, and the
recording sink (aiosmtpd) offering SMTPUTF8 or not. An upstream that offers it gets every
address as the agent wrote it; one that does not gets an international domain in A-labels
(the same mailbox), and a UTF-8 local part, which nothing else can carry, bounces with
5.6.7 instead of waiting in the queue for an upstream that will never take it.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import format_datetime, make_msgid

import pytest

from gateway.mail.idn import ascii_address
from gateway.outbound.upstream import SmtpUpstream
from gateway.store.models import DeliveryStatus, utcnow
from tests.conftest import AGENT, PASSWORD, Harness
from tests.outbound.test_delivery import (
    deliveries,
    eventually,
    parse_dsn,
    queued_id,
    unfolded,
)
from tests.support import Sink

UTF8_PROSPECT = "jörg@bücher.example"  # a UTF-8 local part: SMTPUTF8 or nothing
IDN_PROSPECT = "info@müller-immobilien.de"  # an ASCII mailbox at an international domain
IDN_IN_A_LABELS = "info@xn--mller-immobilien-jzb.de"


def utf8_message(recipients: list[str]) -> bytes:
    """An RFC 6532 message: UTF-8 in its header fields as in its body."""
    fields = [
        f"From: Anna Agent <{AGENT}>",
        f"To: {', '.join(recipients)}",
        "Subject: Ihr Exposé für Jörg",
        f"Message-ID: {make_msgid(domain='broker.example')}",
        f"Date: {format_datetime(utcnow())}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(fields) + "\r\n\r\nGuten Tag, Jörg!\r\n").encode()


async def send_utf8(relay: Harness, recipients: list[str]) -> str:
    """As the agent, MAIL with SMTPUTF8; the 250's text."""
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        assert client.supports_extension("smtputf8")
        _, reply = await client.sendmail(
            AGENT, recipients, utf8_message(recipients), mail_options=["SMTPUTF8"]
        )
    return reply


async def settled(relay: Harness, message_id: str) -> dict[str, DeliveryStatus]:
    """Each recipient's state once none is queued any more."""
    db = relay.relay.db

    async def done() -> dict[str, DeliveryStatus] | None:
        rows = await deliveries(db, message_id)
        finished = {DeliveryStatus.DELIVERED, DeliveryStatus.BOUNCED}
        if rows and all(row.status in finished for row in rows):
            return {row.recipient: DeliveryStatus(row.status) for row in rows}
        return None

    return await eventually(done)


async def test_an_upstream_that_offers_smtputf8_gets_the_addresses_as_written(
    relay: Harness,
) -> None:
    relay.sink.smtputf8 = True
    message_id = queued_id(await send_utf8(relay, [UTF8_PROSPECT, IDN_PROSPECT]))

    assert await settled(relay, message_id) == {
        IDN_PROSPECT: DeliveryStatus.DELIVERED,
        UTF8_PROSPECT: DeliveryStatus.DELIVERED,
    }
    copies = relay.sink.messages
    assert sorted(r for copy in copies for r in copy.rcpt_tos) == [IDN_PROSPECT, UTF8_PROSPECT]
    for copy in copies:
        assert copy.mail_from == AGENT and copy.smtputf8
        # RFC 6531 3.7.3: the trace names the protocol the message came by
        assert b" with UTF8SMTPSA id " in b" ".join(copy.data.split())
        assert "Subject: Ihr Exposé für Jörg".encode() in copy.data


async def test_without_smtputf8_upstream_a_domain_goes_in_a_labels_and_a_utf8_mailbox_bounces(
    relay: Harness,
) -> None:
    message_id = queued_id(await send_utf8(relay, [IDN_PROSPECT, UTF8_PROSPECT]))

    assert await settled(relay, message_id) == {
        IDN_PROSPECT: DeliveryStatus.DELIVERED,
        UTF8_PROSPECT: DeliveryStatus.BOUNCED,
    }
    received = await relay.sink.expect(2)  # the copy, and the agent's bounce
    [copy] = [m for m in received if m.mail_from == AGENT]
    assert copy.rcpt_tos == [IDN_IN_A_LABELS] and not copy.smtputf8
    [report] = [m for m in received if m.mail_from == "<>"]
    assert report.rcpt_tos == [AGENT]
    _, _, [block] = parse_dsn(report.data)
    assert unfolded(block["Final-Recipient"]) == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert block["Action"] == "failed" and block["Status"] == "5.6.7"
    assert unfolded(block["Diagnostic-Code"]) == (
        "smtp; 550 5.6.7 127.0.0.1 does not offer SMTPUTF8, which this recipient's address needs"
    )
    assert len(relay.sink.messages) == 2


async def test_a_utf8_sender_without_smtputf8_upstream_fails_every_recipient(
    sink: Sink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """The sender's mailbox has no ASCII form: no recipient can get the copy that way, and
    the upstream gets nothing; a sender at an international domain goes in A-labels."""
    data = b"From: x@example.com\r\nSubject: x\r\n\r\nx\r\n"
    upstream = upstreams()
    failed = await upstream.send(UTF8_PROSPECT, ["a@example.com", IDN_PROSPECT], data)
    for outcome in failed.values():
        assert outcome.permanent and outcome.error == (
            "550 5.6.7 127.0.0.1 does not offer SMTPUTF8, which the sender's address needs"
        )
    assert set(failed) == {"a@example.com", IDN_PROSPECT} and sink.messages == []

    [taken] = (await upstream.send(IDN_PROSPECT, ["a@example.com"], data)).values()
    assert taken.delivered
    assert [(m.mail_from, m.rcpt_tos, m.smtputf8) for m in sink.messages] == [
        (IDN_IN_A_LABELS, ["a@example.com"], False)
    ]

    sink.smtputf8 = True
    [taken] = (await upstreams().send(UTF8_PROSPECT, ["a@example.com"], data)).values()
    assert taken.delivered
    assert (sink.messages[-1].mail_from, sink.messages[-1].smtputf8) == (UTF8_PROSPECT, True)


def headed(subject: str, body: bytes = b"Guten Tag!\r\n") -> bytes:
    """A message to ASCII addresses whose Subject may be UTF-8 (RFC 6532)."""
    fields = [
        f"From: Anna Agent <{AGENT}>",
        "To: prospect@example.com",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(fields) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("size", [100, 400_000], ids=["whole", "from-the-blob"])
async def test_a_utf8_header_block_goes_with_smtputf8_where_the_upstream_offers_it(
    relay: Harness, size: int
) -> None:
    """Every address ASCII, the Subject UTF-8: RFC 6532 mail, which SMTPUTF8 carries. A big
    copy (sent from its stored blob, never whole) is marked as a small one is."""
    relay.sink.smtputf8 = True
    raw = headed("Ihr Exposé für Jörg", (b"x" * 70 + b"\r\n") * (size // 72 + 1))
    async with relay.client(username=AGENT, password=PASSWORD) as client:
        await client.sendmail(AGENT, ["prospect@example.com"], raw, mail_options=["SMTPUTF8"])
    [copy] = await relay.sink.expect(1)
    assert copy.smtputf8 and copy.rcpt_tos == ["prospect@example.com"]
    assert "Subject: Ihr Exposé für Jörg".encode() in copy.data
    assert copy.data.endswith(raw[-200:])


async def test_a_utf8_header_block_goes_as_8bit_data_where_the_upstream_does_not_offer_it(
    sink: Sink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """No address needs SMTPUTF8: the copy goes as such mail always went, its bytes as they
    are, rather than bouncing over a Subject."""
    data = headed("Ihr Exposé für Jörg")
    [taken] = (await upstreams().send(AGENT, ["prospect@example.com"], data)).values()
    assert taken.delivered
    [copy] = sink.messages
    assert not copy.smtputf8 and copy.data.endswith(data)


async def test_an_ascii_header_block_asks_for_no_smtputf8_whatever_its_body(
    sink: Sink, upstreams: Callable[..., SmtpUpstream]
) -> None:
    """UTF-8 in the body alone is 8BITMIME's business (RFC 6152), not SMTPUTF8's."""
    sink.smtputf8 = True
    data = headed("=?utf-8?q?Ihr_Expos=C3=A9?=", "Grüße\r\n".encode())
    [taken] = (await upstreams().send(AGENT, ["prospect@example.com"], data)).values()
    assert taken.delivered
    [copy] = sink.messages
    assert not copy.smtputf8 and copy.data.endswith(data)


@pytest.mark.parametrize(
    ("address", "ascii"),
    [
        ("a@example.com", "a@example.com"),
        (IDN_PROSPECT, IDN_IN_A_LABELS),
        ('"jo hn"@straße.de', '"jo hn"@xn--strae-oqa.de'),
        (UTF8_PROSPECT, None),
        ("jörg@example.com", None),
        ("a@-bad-ü.de", None),
        ("no-at-sign-ü", None),
    ],
)
def test_an_address_in_ascii_when_its_mailbox_is(address: str, ascii: str | None) -> None:
    assert ascii_address(address) == ascii
