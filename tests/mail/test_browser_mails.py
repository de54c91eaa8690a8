"""Every mail the relay writes, rendered in a real headless Chromium as a reader sees it.

The mails come from the real relay: the agent sends over SMTP, the consent goes through the
desk the page calls, the renewal request through the desk method the page's button calls, the
bounce from an upstream that refuses a recipient; the recording sink hands over what left.
Each mail's HTML part is loaded as it is, its text/plain part as a mail client shows plain
text (preformatted, wrapped), on a phone and on a desktop, in German, English and Spanish.
What a reader sees (the page's innerText, and the subject) must hold no markup, no escaped
entities, no Markdown syntax and no placeholders. Screenshots go to
var/screenshots/mails/<language>-<mail>-<part>-<viewport>.png for a person to read.

Uses Debian's /usr/bin/chromium through Playwright, like test_browser_downloads.
"""

from __future__ import annotations

import email
import email.policy
import html
import os
import re
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import select, update

from gateway.mail import headers
from gateway.store.models import Letter, Link, Message
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.conftest import AGENT, Harness, StartRelay
from tests.support import screenshot_dir

PROSPECT = "paula@example.com"
LATE = "lars@example.org"  # a second letter, whose link expires unused
NOBODY = "nobody@example.net"  # refused by the upstream: the agent gets a bounce
DESKTOP = {"width": 1280, "height": 900}
REQUIRED = {"withdrawal", "early-start", "terms"}
LETTER_LINK = re.compile(r"/l/([A-Za-z0-9_-]{43})")
LOCALES = {"de": "de-DE", "en": "en-GB", "es": "es-ES"}
# what the agent writes, in the prospect's language like the relay's own words around it
AGENT_TEXT = {
    "de": ("Guten Tag,\n\nanbei der Grundriss und die Fotos, die Sie sehen wollten.\n", "Termin"),
    "en": ("Hello,\n\nhere are the floor plan and the photos you asked for.\n", "Viewing"),
    "es": ("Hola:\n\nle envío el plano y las fotos que quería ver.\n", "Visita"),
}
# Frequent short words: the language whose words a text uses most is the one it is in.
COMMON_WORDS = {
    "de": {"und", "der", "die", "das", "sie", "ihre", "nicht", "mit", "ist", "zu", "den", "für"},
    "en": {"the", "and", "you", "your", "to", "of", "is", "for", "not", "with", "this", "was"},
    "es": {"el", "la", "los", "las", "que", "de", "y", "su", "usted", "para", "con", "por"},
}

# What must never be visible as text: each pattern with what it would mean.
VISIBLE_DEFECTS = {
    "an HTML tag": re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"),
    "an escaped entity": re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#x[0-9A-Fa-f]+);"),
    "Markdown emphasis": re.compile(r"\*\*|(?<![A-Za-z0-9_-])__(?=\S)"),
    "a Markdown heading": re.compile(r"^[ \t]*#{1,6}[ \t]", re.M),
    "a Markdown link": re.compile(r"\]\("),
    "a Markdown escape": re.compile(r"\\[\\`*_{}\[\]()#+\-.!]"),
    "a placeholder": re.compile(r"\{[A-Za-z_]+\}"),
    "template syntax": re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}"),
    "an HTML comment": re.compile(r"<!--|-->"),
}

PLAIN_PAGE = """<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="margin:0;font-family:Arial,Helvetica,sans-serif;background:#fff">
<pre id="body" style="margin:0;padding:16px;white-space:pre-wrap;overflow-wrap:anywhere;
font-family:Menlo,Consolas,'DejaVu Sans Mono',monospace;font-size:14px">{text}</pre>
</body></html>"""


@dataclass(frozen=True)
class Part:
    mail: str
    subject: str
    content_type: str
    content: str


def offer(language: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>, Lars Late <{LATE}>"
    message["Subject"] = "[Exposé] Villa am See"
    message["X-Sealrelay-Language"] = language
    message.set_content(AGENT_TEXT[language][0])
    message.add_attachment(
        os.urandom(2_500_000), maintype="application", subtype="pdf", filename="Exposé.pdf"
    )
    return message.as_bytes(policy=email.policy.SMTP)


def with_large_attachment(language: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>"
    message["Subject"] = "Grundriss & Fotos"
    message["X-Sealrelay-Language"] = language
    text = AGENT_TEXT[language][0]
    message.set_content(text)
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in text.split("\n\n"))
    message.add_alternative(paragraphs, subtype="html")
    message.add_attachment(
        os.urandom(2_500_000), maintype="image", subtype="jpeg", filename="Wohnzimmer & Küche.jpg"
    )
    return message.as_bytes(policy=email.policy.SMTP)


def plain(language: str, to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = to
    message["Subject"] = AGENT_TEXT[language][1]
    message.set_content(AGENT_TEXT[language][0])
    return message


def readable_parts(name: str, raw: bytes) -> list[Part]:
    """The text/plain and text/html parts a mail client shows as the body (no attachments,
    nothing inside an attached message)."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    subject = headers.decoded(headers.first_value(headers.fields_of(raw), "subject") or "")
    found: list[Part] = []

    def walk(part: Any) -> None:
        if part.get_content_maintype() == "multipart":
            for child in part.iter_parts():
                walk(child)
        elif part.get_content_type() in ("text/plain", "text/html") and not part.is_attachment():
            found.append(Part(name, subject, part.get_content_type(), part.get_content()))

    walk(parsed)
    return found


def languages_of(text: str) -> set[str]:
    """The languages of the text's paragraphs, each judged by its most frequent short words
    (a paragraph with fewer than four of them is too short to judge)."""
    found = set()
    for paragraph in re.split(r"\n\s*\n", text.lower()):
        words = re.findall(r"\w+", paragraph)
        hits = {lang: sum(w in common for w in words) for lang, common in COMMON_WORDS.items()}
        if max(hits.values()) >= 4:
            found.add(max(hits, key=lambda lang: hits[lang]))
    return found


def defects(text: str) -> list[str]:
    return [
        f"{meaning}: {match.group(0)!r} in {around(text, match.start(), match.end())!r}"
        for meaning, pattern in VISIBLE_DEFECTS.items()
        for match in pattern.finditer(text)
    ]


def around(text: str, start: int, end: int) -> str:
    return text[max(0, start - 40) : end + 40]


async def relay_mails(relay: Harness, language: str) -> list[tuple[str, bytes]]:
    """Every kind of mail the relay writes, in `language`, as the upstream received them."""
    sink = relay.sink
    sink.refuse[NOBODY] = "550 5.1.1 No such user here"
    await relay.send(offer(language), recipients=[PROSPECT, LATE])
    letters = {m.rcpt_tos[0]: m.data for m in await sink.expect(2)}
    await relay.send(with_large_attachment(language), recipients=[PROSPECT])
    [linked] = [m.data for m in await sink.expect(3) if b"Grundriss" in m.data]
    # and one the upstream cannot take, having no SMTPUTF8: 5.6.7 has words of its own
    await relay.send(plain(language, NOBODY), recipients=[NOBODY, "jörg@bücher.example"])
    [bounce] = await wait_for(relay, lambda m: m.mail_from in ("", "<>") and b"report" in m.data)

    tokens = {r: LETTER_LINK.search(letter_text(d)) for r, d in letters.items()}
    token = tokens[PROSPECT]
    assert token is not None
    await relay.relay.letters.release(token[1], REQUIRED, "192.0.2.7", "Mozilla/5.0 (phone)")
    [released] = await wait_for(relay, lambda m: b"X-Sealrelay-Consent" in m.data)
    [confirmation] = await wait_for(
        relay, lambda m: b"application/pdf" in m.data and m.rcpt_tos == [AGENT]
    )

    renewal_mail = await request_renewal(relay)
    return [
        ("letter", letters[PROSPECT]),
        ("links", linked),
        ("released", released),
        ("confirmation", confirmation),
        ("renewal", renewal_mail),
        ("dsn", bounce),
    ]


def letter_text(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def wait_for(relay: Harness, predicate: Any) -> list[bytes]:
    """The copies matching `predicate`, waiting (bounded) until there is one."""
    for _ in range(60):
        matching = relay.sink.where(predicate)
        if matching:
            return [m.data for m in matching]
        await relay.sink.expect(len(relay.sink.messages) + 1)
    raise AssertionError("no such copy arrived")


async def request_renewal(relay: Harness) -> bytes:
    """The late prospect's link expires; they ask for a new one, as the page's button does."""
    async with relay.relay.db.transaction() as session:
        letter = await session.scalar(select(Letter).where(Letter.recipient == LATE))
        assert letter is not None
        await session.execute(update(Link).where(Link.id == letter.link_id).values(expired=True))
        message = await session.scalar(select(Message).where(Message.id == letter.message_id))
        assert message is not None
        session.expunge_all()
    before = len(relay.sink.messages)
    assert await relay.relay.letters.request_new_link(letter, message, "192.0.2.8")
    [received] = (await relay.sink.expect(before + 1))[before:]
    return received.data


@pytest.mark.parametrize("language", ["de", "en", "es"])
async def test_every_mail_reads_clean_on_a_phone_and_a_desktop(
    relay_factory: StartRelay, language: str
) -> None:
    async_playwright = playwright_api()
    relay = await relay_factory(
        smtp={"max_message_size": 20 * 1024 * 1024},
        policy={"language": language},
        branding={"company_name": "Müller & Söhne Immobilien"},
    )
    mails = await relay_mails(relay, language)
    parts = [part for name, raw in mails for part in readable_parts(name, raw)]
    kinds = {(p.mail, p.content_type) for p in parts}
    assert {(name, "text/plain") for name, _ in mails} <= kinds
    assert {("letter", "text/html"), ("links", "text/html")} <= kinds

    shots = screenshot_dir("mails")
    problems: list[str] = []
    for part in parts:
        problems += [f"{part.mail} subject: {d}" for d in defects(part.subject)]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            for viewport_name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                context = await browser.new_context(
                    viewport=viewport,
                    device_scale_factor=2 if viewport_name == "phone" else 1,
                    is_mobile=viewport_name == "phone",
                    locale=LOCALES[language],
                    java_script_enabled=True,
                )
                # a mail client loads nothing from elsewhere either
                await context.route("**/*", lambda route: route.abort())
                page = await context.new_page()
                for part in parts:
                    kind = "html" if part.content_type == "text/html" else "text"
                    content = (
                        part.content
                        if kind == "html"
                        else PLAIN_PAGE.format(lang=language, text=html.escape(part.content))
                    )
                    await page.set_content(content)
                    seen = await page.evaluate("document.body.innerText")
                    where = f"{part.mail} {kind} on a {viewport_name}"
                    problems += [f"{where}: {d}" for d in defects(seen)]
                    if not seen.strip():
                        problems.append(f"{where}: nothing visible")
                    if languages_of(seen) != {language}:
                        problems.append(f"{where}: written in {sorted(languages_of(seen))}")
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    if width > viewport["width"]:
                        problems.append(f"{where}: {width} px wide, wider than the screen")
                    await page.screenshot(
                        path=str(shots / f"{language}-{part.mail}-{kind}-{viewport_name}.png"),
                        full_page=True,
                    )
                await context.close()
        finally:
            await browser.close()
    assert not problems, "\n".join(problems)
