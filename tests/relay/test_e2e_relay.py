"""End to end: a real client -> sealrelay -> a recording upstream, on SQLite and PostgreSQL."""

from __future__ import annotations

import dkim as dkimpy

from gateway.mail import headers
from tests.conftest import AGENT, Harness, dkim_dns, make_message


async def test_mail_is_relayed_signed_and_traced(relay: Harness) -> None:
    reply = await relay.send(make_message(to="prospect@example.com, other@example.org"))
    assert reply.startswith("2.0.0 Ok: queued as ")

    [copy] = await relay.sink.expect(1)
    assert copy.mail_from == AGENT
    assert sorted(copy.rcpt_tos) == ["other@example.org", "prospect@example.com"]
    fields = headers.fields_of(copy.data)
    assert fields[0].name == "dkim-signature"
    assert fields[1].name == "received" and "with ESMTPSA" in fields[1].value
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))
    assert headers.first_value(fields, "message-id")
