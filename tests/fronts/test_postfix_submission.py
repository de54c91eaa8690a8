"""A Postfix that logs in to the relay as an agent, as a server's or an appliance's MTA
does with a smart host and SASL: STARTTLS, AUTH, pipelining, and `AUTH=<>` on every MAIL
(RFC 4954 5) as Exim (Debian's default MTA) and Postfix before 2.9 send it. Its mail must go
out once, signed, under the agent's name."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway import users
from gateway.store.models import Message
from tests.conftest import AGENT, PASSWORD, StartRelay, dkim_dns
from tests.postfix_instance import postfix_instance
from tests.queue_wait import queue_idle

pytestmark = pytest.mark.slow

PROSPECT = "prospect@example.com"


def mail(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = PROSPECT
    message["Subject"] = subject
    message.set_content("Guten Tag!\n")
    return message.as_bytes(policy=email.policy.SMTP)


async def test_a_postfix_logged_in_as_an_agent_sends_through_the_relay(
    relay_factory: StartRelay, tmp_path: Path
) -> None:
    relay = await relay_factory()
    sasl = [
        "smtp_sasl_auth_enable = yes",
        f"smtp_sasl_password_maps = static:{{{AGENT}:{PASSWORD}}}",  # braces: spaces
        "smtp_sasl_security_options = noanonymous",
        "smtp_tls_security_level = encrypt",  # the relay takes AUTH only over TLS
        "smtp_send_dummy_mail_auth = yes",  # AUTH=<> on MAIL, as Exim and older Postfix send
    ]
    async with postfix_instance(
        tmp_path / "postfix",
        relayhost=f"[127.0.0.1]:{relay.smtp_port}",
        main_cf=sasl,
    ) as postfix:
        for subject in ("Ihr Exposé", "Die Unterlagen"):
            await aiosmtplib.send(
                mail(subject),
                sender=AGENT,
                recipients=[PROSPECT],
                hostname="127.0.0.1",
                port=postfix.smtpd_port,
                timeout=30,
            )
        try:
            copies = await relay.sink.expect(2)
        except TimeoutError:
            pytest.fail(f"Postfix did not hand both on; its log:\n{postfix.log()}")
        await postfix.wait_queue_empty()
        log = postfix.log()
    await queue_idle(relay.relay.db)
    assert len(relay.sink.messages) == 2, log
    assert {(c.mail_from, tuple(c.rcpt_tos)) for c in copies} == {(AGENT, (PROSPECT,))}
    for copy in copies:
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(relay.dkim_key))
    agent = await users.agent_by_address(relay.relay.db, AGENT)
    async with relay.relay.db.transaction() as session:
        owners = (await session.scalars(select(Message.user_id))).all()
    assert agent is not None and owners == [agent.user_id] * 2
    assert log.count("status=sent") == 2, log
