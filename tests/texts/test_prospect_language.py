"""The agent's `X-Sealrelay-Language` names a language we do not ship (issue 14, item 9).

Through the real relay on SQLite and PostgreSQL: the copy's link block is written in the
configured default language (not silently in German), and the journal carries a warning.
"""

from __future__ import annotations

import email
import email.policy
import os
from email.message import EmailMessage

from sqlalchemy import select

from gateway.store.models import Event
from rules.facts import MessageFacts
from rules.language import language_of, unsupported_request
from rules.policy import Policy
from tests.conftest import AGENT, Harness, StartRelay

PROSPECT = "prospect@example.com"


def offer(language: str | None, content_language: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = PROSPECT
    message["Subject"] = "Exposé"
    if language is not None:
        message["X-Sealrelay-Language"] = language
    if content_language is not None:
        message["Content-Language"] = content_language
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n")
    message.add_attachment(
        os.urandom(3 * 1024 * 1024), maintype="application", subtype="pdf", filename="a.pdf"
    )
    return message


async def events(harness: Harness, type_: str) -> list[Event]:
    async with harness.relay.db.transaction() as session:
        return list((await session.scalars(select(Event).where(Event.type == type_))).all())


def text_of(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def test_unknown_language_falls_back_to_the_default_and_is_journaled(
    relay_factory: StartRelay,
) -> None:
    harness = await relay_factory(
        smtp={"max_message_size": 8 * 1024 * 1024}, policy={"language": "en"}
    )
    # the mail client's own Content-Language does not override the fallback either
    await harness.send(offer("fr-FR", content_language="es"))
    [copy] = await harness.sink.expect(1)
    text = text_of(copy.data)
    assert "ready for you to download" in text, text
    assert "zum Download bereit" not in text

    [warning] = await events(harness, "language.unsupported")
    assert warning.data == {
        "header": "X-Sealrelay-Language",
        "requested": "fr-FR",
        "used": {PROSPECT: "en"},
    }
    [received] = await events(harness, "message.received")
    assert warning.message_id == received.message_id


async def test_a_known_language_writes_no_warning(relay_factory: StartRelay) -> None:
    harness = await relay_factory(smtp={"max_message_size": 8 * 1024 * 1024})
    await harness.send(offer("es"))
    [copy] = await harness.sink.expect(1)
    assert "disponible para descargar" in text_of(copy.data)
    assert await events(harness, "language.unsupported") == []


def test_the_choice_is_pure_policy() -> None:
    def facts(*headers: tuple[str, str]) -> MessageFacts:
        return MessageFacts("a@b.example", None, ("p@example.com",), "", headers)

    policy = Policy(language="en")
    assert language_of(facts(("x-sealrelay-language", "ES_es")), policy.language) == "es"
    assert language_of(facts(("x-sealrelay-language", "fr")), policy.language) == "en"
    assert unsupported_request(facts(("x-sealrelay-language", "fr"))) == "fr"
    assert unsupported_request(facts(("x-sealrelay-language", " "))) is None
    # without the agent's choice, the message's own language counts, silently
    assert language_of(facts(("content-language", "es")), policy.language) == "es"
    assert language_of(facts(("content-language", "fr")), policy.language) == "en"
    assert unsupported_request(facts(("content-language", "fr"))) is None
