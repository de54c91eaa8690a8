"""Every mail the relay writes itself leaves through one door, so all of them look alike.

The bounce, the consent confirmation, the renewal request and the expiry notice come from the
real relay (an upstream refusing a recipient, the desk the consent page calls, the renewal
button's function, the sweep's expiry) as the upstream receives them. Each must carry the
same head: a From at the agent's signing domain, Auto-Submitted and X-Auto-Response-Suppress
(so no mailbox answers with an out-of-office reply), a Message-ID in the relay's name, and
be 7-bit mail with CRLF line ends; each is journaled as queued once per copy. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta

from sqlalchemy import select, update

from gateway.mail import headers
from gateway.store.events import BOUNCE_QUEUED, DELIVERY_QUEUED
from gateway.store.models import Event, Letter, Link, Message, MessageKind
from tests.conftest import AGENT, Harness, StartRelay
from tests.mail.test_browser_mails import LATE, relay_mails, wait_for

OWN_MAILS = ("confirmation", "renewal", "dsn", "expiry notice")
QUEUED = {MessageKind.BOUNCE: BOUNCE_QUEUED.name, MessageKind.CONFIRMATION: DELIVERY_QUEUED.name}


async def expiry_notice(relay: Harness) -> bytes:
    """The late prospect's letter runs out unanswered: the sweep tells the agent."""
    now = relay.relay.clock()
    async with relay.relay.db.transaction() as session:
        letter = await session.scalar(select(Letter).where(Letter.recipient == LATE))
        assert letter is not None
        ran_out = update(Link).where(Link.id == letter.link_id)
        await session.execute(ran_out.values(expires_at=now - timedelta(seconds=1)))
    assert await relay.relay.letters.expire_due(now) == 1
    [notice] = await wait_for(relay, lambda m: is_expiry(m.data))
    return notice


def is_expiry(raw: bytes) -> bool:
    subject = headers.decoded(headers.first_value(headers.fields_of(raw), "subject") or "")
    return subject.startswith("Ohne Zustimmung abgelaufen")


def assert_one_head(name: str, raw: bytes, hostname: str) -> None:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    [author] = parsed["From"].addresses
    assert author.domain == "broker.example", (name, str(parsed["From"]))
    assert author.display_name in ("sealrelay", "Mail Delivery System"), (name, author)
    assert [a.addr_spec for a in parsed["To"].addresses] == [AGENT], name
    assert parsed["Auto-Submitted"] in ("auto-generated", "auto-replied"), name
    assert parsed["X-Auto-Response-Suppress"] == "All", name
    assert parsed["Message-ID"].endswith(f"@{hostname}>"), name
    assert parsed["MIME-Version"] == "1.0", name
    assert not parsed.defects, (name, parsed.defects)
    assert raw.isascii(), name
    assert not headers.has_bare_line_end(raw), name


async def test_the_relays_own_mails_share_one_head_and_one_queue_event(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(
        smtp={"max_message_size": 20 * 1024 * 1024}, policy={"language": "de"}
    )
    mails = dict(await relay_mails(relay, "de"))
    mails["expiry notice"] = await expiry_notice(relay)

    for name in OWN_MAILS:
        assert_one_head(name, mails[name], relay.settings.server.hostname)
    async with relay.relay.db.transaction() as session:
        own = (await session.scalars(select(Message).where(Message.sender == ""))).all()
        events = (await session.scalars(select(Event))).all()
    assert sorted(m.kind for m in own) == sorted(
        [MessageKind.BOUNCE, *[MessageKind.CONFIRMATION] * 3]
    )
    for message in own:
        queued = [e for e in events if e.message_id == message.id and e.type in QUEUED.values()]
        assert [(e.type, e.data["recipient"]) for e in queued] == [(QUEUED[message.kind], AGENT)]
