"""The console's work pages over real HTTP: the timeline, a message's story, the agent's
actions, letters waiting and the admin pages, against a relay that made its messages through
SMTP, on both databases."""

from __future__ import annotations

import asyncio
import email
import email.policy
import html
import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from zoneinfo import ZoneInfo

import aiosmtplib
import pytest
from aiohttp import web
from sqlalchemy import select

from gateway.console.timeline import RecipientState
from gateway.links.desk import MAX_DAYS
from gateway.store import journal
from gateway.store.events import BLOBS_DELETED
from gateway.store.models import Event, JournalHead, Link, LinkKind, Message
from gateway.store.sequencer import chain_all
from tests.conftest import PASSWORD
from tests.console.client import speaking
from tests.console.work_world import (
    ADMIN,
    AGENT,
    AUDITOR,
    BUYER,
    World,
    get_bytes,
    send_as,
    world_of,
)
from tests.letter_site import BIG_PDF, PROSPECT, LetterSite, offer, token_in
from tests.links.test_link_actions import SAFE_LINKS
from tests.queue_wait import queue_idle
from tests.support import free_port
from web.console.timeline import VALID_UNTIL, RecipientView, last_day

FILE_PATH = re.compile(r'href="(/d/[A-Za-z0-9_-]{43}/f/[0-9a-f]+)"')


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async for made in world_of(site):
        yield made


def visible(page: str) -> str:
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", page).split()))


async def types_of(world: World) -> list[str]:
    async with world.site.relay.db.transaction() as session:
        return list((await session.scalars(select(Event.type).order_by(Event.id))).all())


async def test_the_story_shows_scanner_views_apart_and_the_first_download(world: World) -> None:
    site = world.site
    response, _ = await site.request("HEAD", f"/d/{world.link_token}")
    response, _ = await site.request(
        "GET", f"/d/{world.link_token}", headers={"User-Agent": SAFE_LINKS}
    )
    response, body = await site.get(f"/d/{world.link_token}")
    assert response.status == 200
    [file_path] = set(FILE_PATH.findall(body.decode()))
    for _ in range(2):
        response, _ = await site.get(file_path)
        assert response.status == 200
    agent = world.consoles[AGENT]
    page = await agent.get(f"/console/messages/{world.link_message}")
    assert page.status == 200
    text = visible(page.text)
    scanner = text.split("Automated visits (not a person)")[1]
    assert "Download page viewed" in scanner and "Why automated" in scanner
    assert "asked with HEAD, which browsers do not use" in scanner
    assert "the browser named is a scanner or a program" in scanner
    people = text.split("Automated visits")[0]
    assert people.count("First download") == 1
    assert "Repeated download" in people
    assert "Exposé Villa am See.pdf" in people
    assert "First download" not in scanner
    assert "Delivered upstream" in people and "Download link created" in people
    # the German page says the same in German, times in the branding zone
    async with agent.http.get(
        agent.base + f"/console/messages/{world.link_message}",
        headers={"Accept-Language": "de"},
    ) as german:
        text_de = visible(await german.text())
    assert "Erster Download" in text_de and "Automatische Aufrufe" in text_de
    scanner_de = text_de.split("Automatische Aufrufe")[1]
    assert "mit HEAD abgefragt, was Browser nicht tun" in scanner_de
    assert "der angegebene Browser ist ein Scanner oder ein Programm" in scanner_de
    assert "HEAD request" not in text_de and "scanner user agent" not in text_de
    assert re.search(r"\d\d:\d\d:\d\d Uhr ME", text_de), text_de[:400]


async def test_consent_shows_its_evidence_and_documents(world: World) -> None:
    site = world.site
    assert (await site.consent(world.letter_token)).status == 303
    agent = world.consoles[AGENT]
    page = await agent.get(f"/console/messages/{world.letter_message}")
    text = visible(page.text)
    assert "Registered letter sent" in text and "Consent given" in text
    assert "Texts hash (SHA-256)" in text and "IP address" in text and "Browser" in text
    letter = await site.letter_row()
    assert letter.texts_sha256 in text
    status, pdf, headers = await get_bytes(
        agent, f"/console/messages/{world.letter_message}/letters/{world.letter_id}/consent.pdf"
    )
    assert (
        status == 200 and pdf.startswith(b"%PDF") and headers["Content-Type"] == "application/pdf"
    )
    status, eml, headers = await get_bytes(
        agent, f"/console/messages/{world.letter_message}/letters/{world.letter_id}/original.eml"
    )
    assert status == 200 and headers["Content-Type"] == "message/rfc822"
    parsed = email.message_from_bytes(eml, policy=email.policy.default)
    assert parsed["Subject"] == "[Exposé] Villa am See" or "Villa am See" in str(parsed["Subject"])
    waiting = await agent.get("/console/letters")
    assert PROSPECT not in waiting.text, "a consented letter waits no longer"


async def test_revoke_extend_and_their_refusals(world: World) -> None:
    agent = world.consoles[AGENT]
    path = f"/console/messages/{world.link_message}"
    csrf = await world.csrf(AGENT, path)
    later = (datetime.now() + timedelta(days=60)).date().isoformat()
    answer = await agent.post(path + "/extend", {"csrf": csrf, "recipient": BUYER, "until": later})
    assert answer.status == 303 and answer.location == path + "?done=extended"
    notice = await agent.get(answer.location)
    assert "The links are valid until the new date." in notice.text
    async with world.site.relay.db.transaction() as session:
        link = await session.scalar(select(Link).where(Link.id == world.link_id))
        assert link is not None and link.expires_at.date().isoformat() == later

    answer = await agent.post(
        path + "/revoke", {"csrf": csrf, "recipient": BUYER.upper(), "reason": "Objekt verkauft"}
    )
    assert answer.status == 303 and answer.location == path + "?done=revoked"
    response, body = await world.site.get(f"/d/{world.link_token}")
    assert response.status == 410
    assert "Zugang beendet" in body.decode() or "Access ended" in body.decode()
    again = await agent.post(path + "/revoke", {"csrf": csrf, "recipient": BUYER})
    assert again.location == path + "?done=revoked_none"

    before = len(await types_of(world))
    refused = await agent.post(path + "/extend", {"csrf": csrf, "recipient": BUYER, "until": later})
    assert refused.status == 409
    assert "not possible in the current state" in visible(refused.text)
    assert "was revoked" in visible(refused.text)
    bad_date = await agent.post(
        path + "/extend", {"csrf": csrf, "recipient": BUYER, "until": "31.12.2027"}
    )
    assert bad_date.status == 400 and "Please check the input" in visible(bad_date.text)
    # the refusal's own words are in the reader's language too, not English inside German
    extend = {"csrf": csrf, "recipient": BUYER}
    revoked_de = visible(
        (await agent.post(path + "/extend", {**extend, "until": later}, **speaking("de"))).text
    )
    bad_date_de = visible(
        (
            await agent.post(path + "/extend", {**extend, "until": "31.12.2027"}, **speaking("de"))
        ).text
    )
    assert "ein beendeter Link lässt sich nicht verlängern" in revoked_de
    assert "was revoked" not in revoked_de
    assert "Das neue Ablaufdatum ist kein Datum (JJJJ-MM-TT)." in bad_date_de
    stranger = await agent.post(
        path + "/revoke", {"csrf": csrf, "recipient": "stranger@example.com"}
    )
    assert stranger.status == 404
    assert len(await types_of(world)) == before, "refusals write nothing"
    story = visible((await agent.get(path)).text)
    assert "Access ended" in story and "Objekt verkauft" in story and "Link extended" in story


def last_offered(page: str, recipient: str) -> date:
    """The `max` of the extend form's date field for this recipient."""
    form = re.search(
        rf'value="{re.escape(recipient)}">\s*<label[^>]*>[^<]*</label>\s*<input[^>]*max="([0-9-]+)"',
        page,
    )
    assert form is not None, recipient
    return date.fromisoformat(form.group(1))


@pytest.mark.parametrize(("kind", "days"), [("download", 3650), ("letter", 365)])
async def test_the_extend_form_offers_no_day_the_desk_refuses(
    world: World, kind: str, days: int
) -> None:
    """The date picker stops at the last day the link may run to: no refusal to meet."""
    agent = world.consoles[AGENT]
    message, recipient = (
        (world.link_message, BUYER) if kind == "download" else (world.letter_message, PROSPECT)
    )
    path = f"/console/messages/{message}"
    last = last_offered((await agent.get(path)).text, recipient)
    assert abs(last - (datetime.now(UTC) + timedelta(days=days)).date()) <= timedelta(days=1)
    csrf = await world.csrf(AGENT, path)
    form = {"csrf": csrf, "recipient": recipient}
    beyond = await agent.post(path + "/extend", {**form, "until": str(last + timedelta(days=1))})
    assert beyond.status == 400 and f"at most {days} days" in visible(beyond.text)
    answer = await agent.post(path + "/extend", {**form, "until": last.isoformat()})
    assert answer.status == 303 and answer.location == path + "?done=extended"


async def test_resend_release_and_a_preview_that_records_nothing(world: World) -> None:
    site = world.site
    agent = world.consoles[AGENT]
    path = f"/console/messages/{world.letter_message}"
    letter = f"{path}/letters/{world.letter_id}"
    waiting = await agent.get("/console/letters")
    assert PROSPECT in waiting.text and "Villa am See" in visible(waiting.text)

    before = await world.journal_size()
    preview = await agent.get(letter + "/preview")
    assert preview.status == 200
    assert "/l/" not in preview.text and 'method="post"' not in preview.text.split("<main")[1]
    assert "Provisionspflichtig beauftragen" in preview.text
    assert "records no view" in visible(preview.text)
    link_preview = await agent.get(
        f"/console/messages/{world.link_message}/links/{world.link_id}/preview"
    )
    assert link_preview.status == 200 and "Exposé Villa am See.pdf" in visible(link_preview.text)
    assert await world.journal_size() == before, "a preview records nothing"

    csrf = await world.csrf(AGENT, path)
    sent = len(site.sink.messages)
    answer = await agent.post(letter + "/resend", {"csrf": csrf})
    assert answer.status == 303 and answer.location == path + "?done=resent"
    await site.sink.expect(sent + 1)
    fresh = token_in(site.sink.messages[-1].data, site.url)
    assert fresh != world.letter_token
    response, _ = await site.get(f"/l/{world.letter_token}")
    assert response.status == 410
    response, _ = await site.get(f"/l/{fresh}")
    assert response.status == 200

    before = len(await types_of(world))
    no_reason = await agent.post(letter + "/release", {"csrf": csrf, "reason": "  "})
    assert no_reason.status == 400 and "a reason is required" in visible(no_reason.text)
    assert len(await types_of(world)) == before
    answer = await agent.post(
        letter + "/release", {"csrf": csrf, "reason": "Telefonisch bestätigt"}
    )
    assert answer.status == 303 and answer.location == path + "?done=released"
    types = await types_of(world)
    assert "letter.released_by_agent" in types and "consent.given" not in types
    twice = await agent.post(letter + "/release", {"csrf": csrf, "reason": "noch einmal"})
    assert twice.status == 409
    assert "is released; only a held letter can be released" in visible(twice.text)
    again = {"csrf": csrf, "reason": "otra vez"}
    twice_es = visible((await agent.post(letter + "/release", again, **speaking("es"))).text)
    assert "tiene el estado «liberado»; solo se puede liberar una carta retenida" in twice_es
    status, eml, _ = await get_bytes(agent, letter + "/original.eml")
    assert status == 200 and b"X-Sealrelay-Released-By-Agent" in eml
    no_consent = await agent.get(letter + "/consent.pdf")
    assert no_consent.status == 409 and "has no consent" in visible(no_consent.text)
    assert PROSPECT not in (await agent.get("/console/letters")).text


async def test_markup_in_subjects_file_names_and_names_is_shown_as_text(world: World) -> None:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = '"<b>Bold</b> Buyer" <xss@example.com>'
    message["Subject"] = "<script>alert(1)</script> Haus"
    message.set_content("Guten Tag\n")
    message.add_attachment(
        BIG_PDF, maintype="application", subtype="pdf", filename="<img src=x onerror=alert(2)>.pdf"
    )
    raw = message.as_bytes(policy=email.policy.SMTP)
    await send_as(world.site, AGENT, raw, "xss@example.com")
    agent = world.consoles[AGENT]
    listing = await agent.get("/console/messages?q=alert")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Haus" in listing.text
    assert "<script" not in listing.text
    [message_path] = re.findall(r'href="(/console/messages/[0-9a-f]+)"', listing.text)
    story = await agent.get(message_path)
    assert "<script" not in story.text and "<img src=x" not in story.text
    assert "&lt;script&gt;" in story.text
    assert "&lt;img src=x onerror=alert(2)&gt;.pdf" in story.text
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, "/console/admin/users")
    made = await admin.post(
        "/console/admin/users",
        {"csrf": csrf, "email": "mark@broker.example", "role": "agent", "group": "<b>nord</b>"},
    )
    assert made.status == 201
    assert "&lt;b&gt;nord&lt;/b&gt;" in made.text and "<b>nord</b>" not in made.text


async def test_the_timeline_searches_filters_and_pages(world: World) -> None:
    agent = world.consoles[AGENT]
    for n in range(3):
        await send_as(
            world.site, AGENT, offer(subject=f"Nummer {n}", big=False), f"n{n}@example.com"
        )
    everything = await agent.get("/console/messages")
    assert everything.status == 200
    assert "Nummer 2" in everything.text and "Villa am See" in everything.text
    found = await agent.get("/console/messages?q=n1%40example")
    assert "Nummer 1" in found.text and "Nummer 2" not in found.text
    waiting = visible((await agent.get("/console/messages?state=letter_waiting")).text)
    assert "[Exposé] Villa am See" in waiting and "Nummer" not in waiting
    today = datetime.now().date()
    old = await agent.get(f"/console/messages?to={(today - timedelta(days=2)).isoformat()}")
    assert "No messages match." in visible(old.text)
    bad = await agent.get("/console/messages?from=gestern")
    assert bad.status == 400 and "was not understood" in visible(bad.text)
    assert (await agent.get("/console/messages?after=nonsense")).status == 400
    # pages of 50: more messages than that, then "older"
    for n in range(48):
        await send_as(world.site, AGENT, offer(subject=f"Serie {n}", big=False), "s@example.com")
    first = await agent.get("/console/messages")
    [older] = re.findall(r'href="(/console/messages\?after=[^"]+)"', first.text)
    second = await agent.get(html.unescape(older))
    assert second.status == 200
    ids = lambda page: set(re.findall(r'href="/console/messages/([0-9a-f]+)"', page))  # noqa: E731
    assert ids(first.text) and ids(second.text) and not ids(first.text) & ids(second.text)
    assert len(ids(first.text)) == 50


async def test_admin_adds_a_user_who_then_sends_mail_and_changes_things(world: World) -> None:
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, "/console/admin/users")
    made = await admin.post(
        "/console/admin/users",
        {
            "csrf": csrf,
            "email": "New.Agent@Broker.example",
            "role": "agent",
            "group": "nord",
            "aliases": "desk@broker.example",
        },
    )
    assert made.status == 201
    [password] = re.findall(r'<code class="secret-value">([^<]+)</code>', made.text)
    assert password and "shown only now" in made.text
    again = await admin.get("/console/admin/users")
    assert password not in again.text and "new.agent@broker.example" in again.text
    sent = len(world.site.sink.messages)
    async with world.site.harness.client(
        username="new.agent@broker.example", password=html.unescape(password)
    ) as client:
        await client.sendmail(
            "desk@broker.example",
            ["p@example.com"],
            b"From: desk@broker.example\r\nTo: p@example.com\r\nSubject: Hallo\r\n\r\nTest\r\n",
        )
    await world.site.sink.expect(sent + 1)

    duplicate = await admin.post(
        "/console/admin/users",
        {
            "csrf": csrf,
            "email": "new.agent@broker.example",
            "role": "team_lead",
            "group": "west",
            "aliases": "team-west@broker.example",
        },
    )
    assert duplicate.status == 400 and "could not be saved" in visible(duplicate.text)
    # what was typed stays in the form, for the admin to correct
    assert 'id="new-email" name="email" type="email" required maxlength="320"' in duplicate.text
    assert 'value="new.agent@broker.example"' in duplicate.text
    assert '<option value="team_lead" selected>' in duplicate.text
    assert 'value="west"' in duplicate.text and 'value="team-west@broker.example"' in duplicate.text
    changed = await admin.post(
        "/console/admin/users/change",
        {
            "csrf": csrf,
            "email": "new.agent@broker.example",
            "action": "save",
            "role": "team_lead",
            "group": "sued",
        },
    )
    assert changed.status == 303
    disabled = await admin.post(
        "/console/admin/users/change",
        {"csrf": csrf, "email": "new.agent@broker.example", "action": "disable"},
    )
    assert disabled.status == 303
    listing = visible((await admin.get("/console/admin/users")).text)
    assert "Team lead" in listing and "sued" in listing and "Disabled" in listing
    async with world.site.harness.client() as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("new.agent@broker.example", html.unescape(password))
    enabled = await admin.post(
        "/console/admin/users/change",
        {"csrf": csrf, "email": "new.agent@broker.example", "action": "enable"},
    )
    assert enabled.status == 303
    async with world.site.harness.client() as client:
        await client.login("new.agent@broker.example", html.unescape(password))

    keys = await admin.post("/console/admin/keys", {"csrf": csrf, "name": "CRM", "scope": "read"})
    assert keys.status == 201
    [key] = re.findall(r'<code class="secret-value">([^<]+)</code>', keys.text)
    async with admin.http.get(
        world.url + "/api/v1/messages", headers={"Authorization": f"Bearer {key}"}
    ) as api:
        assert api.status == 200
    key_page = await admin.get("/console/admin/keys")
    assert key not in key_page.text
    [revoke] = re.findall(r'action="(/console/admin/keys/[^/]+/revoke)"', key_page.text)
    assert (await admin.post(revoke, {"csrf": csrf})).status == 303

    hook = await admin.post(
        "/console/admin/webhooks",
        {
            "csrf": csrf,
            "url": "http://127.0.0.1:9/hook",
            "allow_private": "yes",
            "description": "CRM",
        },
    )
    assert hook.status == 201 and "whsec_" in hook.text
    refused = await admin.post(
        "/console/admin/webhooks", {"csrf": csrf, "url": "http://127.0.0.1:9/hook"}
    )
    assert refused.status == 400
    hooks = await admin.get("/console/admin/webhooks")
    assert "whsec_" not in hooks.text
    [disable] = re.findall(r'action="(/console/admin/webhooks/[^/]+/disable)"', hooks.text)
    assert (await admin.post(disable, {"csrf": csrf})).status == 303
    assert "Disabled" in visible((await admin.get("/console/admin/webhooks")).text)
    assert (await admin.post(disable.replace("/disable", "/enable"), {"csrf": csrf})).status == 303
    assert "Disabled" not in visible((await admin.get("/console/admin/webhooks")).text)

    queue = await admin.get("/console/admin/queue")
    assert queue.status == 200
    journal = await admin.get("/console/admin/journal")
    assert "The chain is intact" in visible(journal.text)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_the_journal_page_says_what_is_not_chained_yet(world: World) -> None:
    """Events the sequencer has not reached are no part of the check, so the page says how
    many there are and, when they wait far longer than a pass takes, that something is wrong.
    (PostgreSQL: a held head row keeps the running relay's sequencer off, as another
    process's pass would.)"""
    admin = world.consoles[ADMIN]
    db = world.site.relay.db
    fresh = "newer events are recorded but not chained yet"
    async with db.sessions() as holder:
        await holder.execute(select(JournalHead).with_for_update())
        async with db.transaction() as session:
            await journal.append(session, [BLOBS_DELETED.new({"count": 0, "bytes": 0})] * 2)
        page = visible((await admin.get("/console/admin/journal")).text)
        assert "The chain is intact" in page
        # the console's own reads are journaled too, so at least the two
        assert int(re.findall(rf"(\d+) {fresh}", page)[0]) >= 2
        assert re.search(r"the oldest was written \d+ s ago", page)
        async with db.transaction() as session:
            old = datetime.now(UTC) - timedelta(minutes=5)
            await journal.append(session, [BLOBS_DELETED.new({"count": 1, "bytes": 0})], old)
        page = visible((await admin.get("/console/admin/journal")).text)
        assert fresh not in page
        assert re.search(r"\d+ events have waited 300 s to be chained", page)
        assert "check that a relay process is running" in page
        await holder.rollback()
    await chain_all(db)
    page = visible((await admin.get("/console/admin/journal")).text)
    assert "The chain is intact" in page
    assert "chained yet" not in page and "to be chained" not in page


async def test_an_auditor_sees_everything_and_is_offered_no_change(world: World) -> None:
    auditor = world.consoles[AUDITOR]
    story = await auditor.get(f"/console/messages/{world.link_message}")
    assert story.status == 200 and 'method="post"' not in story.text.split("<main")[1].replace(
        'action="/console/logout', ""
    )
    for path in (
        "/console/admin/users",
        "/console/admin/queue",
        "/console/admin/webhooks",
        "/console/admin/keys",
        "/console/admin/policy",
        "/console/admin/texts",
        "/console/admin/dkim",
    ):
        page = await auditor.get(path)
        assert page.status == 200
        # the bar's sign-out is the one form an auditor is offered
        assert 'method="post"' not in page.text.split("<main")[1], path
    admin = await auditor.get("/console/admin")
    assert "change nothing" in visible(admin.text)


async def test_a_waiting_letter_list_is_soonest_first(world: World) -> None:
    site = world.site
    await site.send_offer(recipient="second@example.com")
    async with site.relay.db.transaction() as session:
        link = await session.scalar(
            select(Link).where(Link.recipient == "second@example.com", Link.kind == LinkKind.LETTER)
        )
        assert link is not None
        link.expires_at = link.expires_at - timedelta(days=3)
    page = visible((await world.consoles[AGENT].get("/console/letters")).text)
    assert page.index("second@example.com") < page.index(PROSPECT)


async def test_a_bounce_shows_the_upstream_reply_and_the_admin_retries_it(world: World) -> None:
    site = world.site
    site.sink.refuse["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
    await site.harness.send(offer(subject="Ins Leere", big=False), recipients=["gone@example.com"])
    await queue_idle(site.relay.db)
    agent = world.consoles[AGENT]
    listing = await agent.get("/console/messages?state=bounced")
    [path] = re.findall(r'href="(/console/messages/[0-9a-f]+)"', listing.text)
    story = visible((await agent.get(path)).text)
    assert "Bounced" in story and "550 5.1.1 <gone@example.com>: no such user" in story

    admin = world.consoles[ADMIN]
    queue = await admin.get("/console/admin/queue")
    assert "no such user" in visible(queue.text) and "Ins Leere" in visible(queue.text)
    [retry] = re.findall(r'action="(/console/admin/queue/[0-9a-f]+/retry)"', queue.text)
    del site.sink.refuse["gone@example.com"]
    received = len(site.sink.messages)
    csrf = await world.csrf(ADMIN, "/console/admin/queue")
    answer = await admin.post(retry, {"csrf": csrf})
    assert answer.status == 303 and answer.location == "/console/admin/queue?done=retried"
    await site.sink.expect(received + 1)
    await queue_idle(site.relay.db)
    assert "no such user" not in (await admin.get("/console/admin/queue")).text
    again = await admin.post(retry, {"csrf": csrf})
    assert again.status == 409 and "nothing to retry" in visible(again.text)
    again_de = visible((await admin.post(retry, {"csrf": csrf}, **speaking("de"))).text)
    assert "es gibt nichts zu wiederholen" in again_de and "nothing to retry" not in again_de


async def test_webhook_deliveries_are_listed_and_one_is_replayed(world: World) -> None:
    got: list[tuple[str, bytes]] = []
    arrived = asyncio.Condition()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        async with arrived:
            got.append((request.headers["webhook-id"], body))
            arrived.notify_all()
        return web.Response(status=200)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        admin = world.consoles[ADMIN]
        csrf = await world.csrf(ADMIN, "/console/admin/webhooks")
        made = await admin.post(
            "/console/admin/webhooks",
            {
                "csrf": csrf,
                "url": f"http://127.0.0.1:{port}/hook",
                "allow_private": "yes",
                "event_types": "message.received",
            },
        )
        assert made.status == 201
        await world.site.harness.send(offer(subject="Neu", big=False), recipients=[BUYER])
        async with asyncio.timeout(30), arrived:
            await arrived.wait_for(lambda: len(got) >= 1)
        hooks = await admin.get("/console/admin/webhooks")
        [endpoint] = re.findall(r'href="(/console/admin/webhooks/[0-9a-f]+)"', hooks.text)
        async with asyncio.timeout(30):
            while "badge-delivered" not in (page := await admin.get(endpoint)).text:
                await asyncio.sleep(0.05)  # the worker records the outcome after the post
        text = visible(page.text)
        assert "message.received" in text and "200" in text
        [seq] = re.findall(r'name="seq" value="(\d+)"', page.text)
        answer = await admin.post(endpoint + "/replay", {"csrf": csrf, "seq": seq})
        assert answer.status == 303 and answer.location == endpoint + "?done=replayed"
        async with asyncio.timeout(30), arrived:
            await arrived.wait_for(lambda: len(got) >= 2)
        assert got[1][0] == got[0][0], "a replay carries the event's own webhook-id"
        bad = await admin.post(endpoint + "/replay", {"csrf": csrf, "seq": "999999"})
        assert bad.status == 409
    finally:
        await runner.cleanup()


async def test_a_null_sender_message_shows_its_sender_as_the_null_path(world: World) -> None:
    """A read receipt sent with MAIL FROM:<> is the agent's; its story names the sender `<>`
    rather than leaving the line empty."""
    site = world.site
    raw = offer(subject="Gelesen: Villa am See", big=False)
    before = len(site.sink.messages)
    async with site.harness.client(username=AGENT, password=PASSWORD) as client:
        await client.sendmail("", [BUYER], raw)
    copies = await site.sink.expect(before + 1)
    assert copies[-1].mail_from == "<>"
    async with site.relay.db.transaction() as session:
        [message_id] = (await session.scalars(select(Message.id).where(Message.sender == ""))).all()
    page = await world.consoles[AGENT].get(f"/console/messages/{message_id}")
    assert page.status == 200
    assert "Sender <>" in visible(page.text), visible(page.text)[:600]


@pytest.mark.parametrize("kind", ["download", "letter"])
def test_the_last_day_offered_holds_across_a_clock_change(kind: str) -> None:
    """Hour by hour around both of Berlin's clock changes: the last day offered ends (at its
    last minute) within the maximum, and the day after it would not."""
    zone = ZoneInfo("Europe/Berlin")
    view = RecipientView("paula@example.com", RecipientState.DELIVERED)
    if kind == "letter":
        view.letters.append("letter-1")
    days = MAX_DAYS[LinkKind(kind)]
    for start in (datetime(2026, 3, 27, tzinfo=UTC), datetime(2026, 10, 23, tzinfo=UTC)):
        for hour in range(24 * 4):
            now = (start + timedelta(hours=hour, minutes=30)).astimezone(zone)
            last = last_day(view, now)
            limit = now.astimezone(UTC) + timedelta(days=days)  # as the desk counts
            assert datetime.combine(last, VALID_UNTIL, zone) <= limit, now
            assert datetime.combine(last + timedelta(days=1), VALID_UNTIL, zone) > limit, now
