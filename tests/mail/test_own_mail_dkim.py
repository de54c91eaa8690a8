"""Evidence and the relay's own mail are DKIM-signed, or the offer is refused before 250.

A registered letter's released original is only evidence when it is signed: an offer from a
domain without a `[dkim]` key is refused at DATA with a reply naming the missing key, and
`check-config` says so in advance. Every mail the relay writes to the agent (confirmation,
renewal request, bounce) comes from the agent's own signed domain and is checked with
dkimpy, an independent verifier. SQLite and PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import func, select

from gateway import users
from gateway.mail import headers
from gateway.store.db import Database
from gateway.store.models import Letter, Message
from tests.cli_runner import sealrelay, write_config
from tests.conftest import AGENT, PASSWORD, dkim_dns
from tests.letter_fixtures import StartSite
from tests.letter_site import Clock, LetterSite
from tests.support import Received, Sink

UNSIGNED_AGENT = "sam@unsigned.example"


def mail(sender: str, subject: str, to: str = "paula@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Sam Sender <{sender}>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n")
    return message


async def send_as(site: LetterSite, login: str, message: EmailMessage) -> None:
    async with site.harness.client(username=login, password=PASSWORD) as client:
        await client.send_message(message)


def assert_signed_by_agents_domain(received: Received, site: LetterSite) -> None:
    fields = headers.fields_of(received.data)
    [author] = headers.addresses(fields, "from")
    assert author.endswith("@broker.example"), author
    assert dkimpy.verify(received.data, dnsfunc=dkim_dns(site.harness.dkim_key))
    signature = headers.first_value(fields, "dkim-signature") or ""
    assert "d=broker.example" in signature.replace(" ", "")


async def test_offer_from_a_domain_without_a_dkim_key_is_refused_before_250(
    site: LetterSite, database: Database
) -> None:
    await users.add_user(database, UNSIGNED_AGENT, PASSWORD)

    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send_as(site, UNSIGNED_AGENT, mail(UNSIGNED_AGENT, "[Exposé] Villa am See"))
    assert refused.value.code == 550
    reply = refused.value.message
    assert "5.7.1" in reply and "DKIM" in reply
    assert '[dkim."unsigned.example"]' in reply, reply
    async with database.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 0
        assert await session.scalar(select(func.count()).select_from(Letter)) == 0

    # Plain mail from that domain still flows, and is the only thing that arrives.
    await send_as(site, UNSIGNED_AGENT, mail(UNSIGNED_AGENT, "Besichtigung am Montag"))
    [arrived] = await site.sink.expect(1)
    assert b"Subject: Besichtigung am Montag" in arrived.data


async def test_agent_confirmation_comes_signed_from_the_agents_domain(site: LetterSite) -> None:
    token, letter = await site.send_offer()
    assert_signed_by_agents_domain(letter, site)
    assert (await site.consent(token)).status == 303

    arrived = await site.sink.expect(3)
    [confirmation] = [m for m in arrived if m.rcpt_tos == [AGENT]]
    assert confirmation.mail_from in ("", "<>")
    assert_signed_by_agents_domain(confirmation, site)
    parsed = email.message_from_bytes(confirmation.data, policy=email.policy.default)
    assert parsed["From"].addresses[0].addr_spec == "postmaster@broker.example"


async def test_renewal_request_comes_signed_from_the_agents_domain(
    site_factory: StartSite,
    sink: Sink,
    clock: Clock,
) -> None:
    site = await site_factory(
        server={"own_mail_sender": "makler-robot"},
    )
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    clock.advance(days=14, seconds=1)
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 200
    [request] = [m for m in await site.sink.expect(2) if m.rcpt_tos == [AGENT]]
    assert_signed_by_agents_domain(request, site)
    assert headers.addresses(headers.fields_of(request.data), "from") == [
        "makler-robot@broker.example"
    ]


async def test_bounce_comes_signed_from_the_agents_domain(site: LetterSite) -> None:
    site.sink.refuse["nobody@example.org"] = "550 5.1.1 no such user"
    await site.harness.send(mail(AGENT, "Besichtigung", to="nobody@example.org"))
    [bounce] = await site.sink.expect(1)
    assert bounce.rcpt_tos == [AGENT]
    assert_signed_by_agents_domain(bounce, site)
    assert headers.addresses(headers.fields_of(bounce.data), "from") == [
        "mailer-daemon@broker.example"
    ]


async def test_check_config_names_rules_that_would_send_unsigned_letters(
    tmp_path: Path, dkim_key_file: Path
) -> None:
    keyed = (
        "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
        f'[dkim."broker.example"]\nselector = "s2026"\nkey_file = "{dkim_key_file}"\n'
    )
    broken = write_config(
        tmp_path,
        "broken.toml",
        keyed + "[[rules]]\n"
        'name = "lawyer-offers"\n'
        'match.senders = ["@Unsigned.example", "anna@broker.example"]\n'
        "set.registered_letter = true\n",
    )
    branch = write_config(
        tmp_path,
        "branch.toml",
        keyed + '[policy]\ninternal_domains = ["broker.example", "branch.example"]\n',
    )
    keyless = write_config(
        tmp_path, "keyless.toml", "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
    )
    error = await sealrelay("check-config", str(broken))
    assert error.code == 1
    assert "rules.lawyer-offers" in error.err and "unsigned.example" in error.err
    [rule] = [line for line in error.err.splitlines() if "rules.lawyer-offers" in line]
    assert "broker.example" not in rule.replace("unsigned.example", "")

    warned = await sealrelay("check-config", str(branch))
    assert warned.code == 0, warned.err
    assert "policy.internal_domains" in warned.err and "branch.example" in warned.err
    assert "warning" in warned.err.lower() and "ok" in warned.out

    nothing = await sealrelay("check-config", str(keyless))
    assert nothing.code == 0, nothing.err
    assert "warning: dkim" in nothing.err.lower() and "registered letter" in nothing.err
