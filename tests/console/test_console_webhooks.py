"""The console's webhook endpoint page over real HTTP, against a real aiohttp receiver that
verifies every post with the `standardwebhooks` package: a test event and its result, a
rotated secret (both signatures during the overlap), a replayed time range (the original
webhook-ids, in order per message), changing the endpoint, and every refusal, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import html
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from gateway.store.db import Database
from gateway.store.journal import lag
from gateway.store.models import Event, WebhookDelivery
from gateway.webhooks.desk import WebhookDesk
from gateway.webhooks.fanout import behind
from tests.console.client import ConsoleClient, speaking
from tests.console.work_world import ADMIN, AUDITOR, BUYER, World, world_of
from tests.letter_site import LetterSite, offer
from tests.queue_wait import queue_idle
from tests.webhooks.receiver import Answer, Receiver

SECRET = re.compile(r'<code class="secret-value">(whsec_[A-Za-z0-9+/=]+)</code>')
PAGE = "/console/admin/webhooks"


@pytest.fixture
async def world(site: LetterSite) -> AsyncIterator[World]:
    async for made in world_of(site):
        yield made


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()


def visible(page: str) -> str:
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", page).split()))


async def add_endpoint(world: World, receiver: Receiver, types: str = "") -> tuple[str, str]:
    """Add an endpoint through the console form; its page and its secret."""
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, PAGE)
    made = await admin.post(
        PAGE,
        {"csrf": csrf, "url": receiver.url, "allow_private": "yes", "event_types": types},
    )
    assert made.status == 201
    secret = SECRET.search(made.text)
    assert secret is not None
    [page] = re.findall(r'href="(/console/admin/webhooks/[0-9a-f]+)"', made.text)
    return page, secret.group(1)


async def settled(console: ConsoleClient, path: str) -> str:
    """The page once the worker has recorded the test's answer (it does so after the post
    returns, so the receiver's own wait ends a moment before)."""
    async with asyncio.timeout(30):
        while 'http-equiv="refresh"' in (page := await console.get(path)).text:
            await asyncio.sleep(0.05)
    return page.text


async def webhooks_idle(db: Database, timeout: float = 30) -> None:
    """Return once every journaled event is fanned out and no webhook delivery waits (the
    worker records outcomes after the posts, so this polls briefly)."""
    desk = WebhookDesk(db)
    async with asyncio.timeout(timeout):
        while True:
            async with db.snapshot() as session:
                lagging = await behind(session) or (await lag(session)).unchained > 0
            if not lagging and not await desk.pending():
                return
            await asyncio.sleep(0.05)


def local(at: datetime, zone: ZoneInfo) -> str:
    return at.astimezone(zone).replace(tzinfo=None).isoformat(timespec="minutes")


async def test_a_test_event_shows_its_answer_waiting_accepted_and_refused(
    world: World, receiver: Receiver
) -> None:
    page, secret = await add_endpoint(world, receiver, "webhook.test")
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, page)
    receiver.gate = asyncio.Event()  # the receiver holds its answer: the page must wait
    sent = await admin.post(page + "/test", {"csrf": csrf})
    assert sent.status == 303
    assert re.fullmatch(re.escape(page) + r"\?test=\d+", sent.location), sent.location
    await receiver.until_waiting(1)
    waiting = await admin.get(sent.location)
    assert waiting.status == 200
    assert '<meta http-equiv="refresh" content="2">' in waiting.text
    assert "The test event is on its way" in visible(waiting.text)
    receiver.gate.set()
    [post] = await receiver.expect(1)
    assert post.type == "webhook.test"
    post.verify(secret)  # the package's own verifier
    text = visible(await settled(admin, sent.location))
    assert "The receiver accepted the test event." in text
    assert re.search(r"Response code 200 Time [^:]+ \d\d:\d\d:\d\d", text), text

    receiver.gate = None
    receiver.answers = [Answer(500)]
    again = await admin.post(page + "/test", {"csrf": csrf})
    text = visible(await settled(admin, again.location))
    assert "did not accept the test event; it is tried again at" in text
    assert "Response code 500" in text and "HTTP 500" in text
    figures = text.split("At a glance")[1]
    assert re.search(r"Waiting to be sent 1 Given up in the last 24 hours 0", figures), figures
    assert "Last accepted by the receiver never" not in figures


async def test_a_rotated_secret_signs_beside_the_old_one_and_is_shown_once(
    world: World, receiver: Receiver
) -> None:
    page, old = await add_endpoint(world, receiver, "webhook.test")
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, page)
    rotated = await admin.post(page + "/rotate-secret", {"csrf": csrf})
    assert rotated.status == 200
    found = SECRET.search(rotated.text)
    assert found is not None
    new = found.group(1)
    assert new != old
    assert "the previous secret keeps signing beside it until" in visible(rotated.text)
    later = await admin.get(page)
    assert new not in later.text and old not in later.text, "a secret is shown once"
    assert "still signs beside the new one until" in visible(later.text)

    sent = await admin.post(page + "/test", {"csrf": csrf})
    assert sent.status == 303
    [post] = await receiver.expect(1)
    assert len(post.signatures) == 2, "one signature per secret during the overlap"
    post.verify(new)
    post.verify(old)  # a receiver not yet switched over still accepts it


async def test_a_time_range_is_replayed_with_its_ids_in_order_per_message(
    world: World, receiver: Receiver
) -> None:
    page, secret = await add_endpoint(world, receiver)
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, page)
    await world.site.harness.send(offer(subject="Neu", big=False), recipients=[BUYER])
    await queue_idle(world.site.relay.db)  # the mail is out: the journal grows no more
    await webhooks_idle(world.site.relay.db)
    async with world.site.relay.db.transaction() as session:
        since = await session.scalar(select(func.min(Event.at)))
    assert since is not None
    zone = ZoneInfo(world.site.harness.settings.branding.timezone)
    first = list(receiver.posts)
    assert first, "the new mail's events were posted"
    posted = {p.seq: p.id for p in first}

    answer = await admin.post(
        page + "/replay-range",
        {
            "csrf": csrf,
            "since": local(since - timedelta(minutes=1), zone),
            "until": local(world.site.clock() + timedelta(minutes=2), zone),
        },
    )
    assert answer.status == 202, visible(answer.text)[:400]
    found = re.search(r"Events queued again for this endpoint: (\d+)\.", visible(answer.text))
    assert found is not None, visible(answer.text)[:400]
    count = int(found.group(1))
    async with world.site.relay.db.transaction() as session:
        journal = (await session.execute(select(Event.seq, Event.message_id))).all()
    # every event from the first one on, but those still waiting for their first post
    assert 0 < count <= len(journal)
    posts = await receiver.expect(len(first) + count)
    replayed = posts[len(first) :]
    assert len(replayed) == count
    for post in replayed:
        post.verify(secret)
        assert post.id == f"evt_{post.seq}", "a replay carries the event's own webhook-id"
        if post.seq in posted:
            assert posted[post.seq] == post.id
    messages = dict(journal)
    order: dict[str | None, list[int]] = defaultdict(list)
    for post in replayed:
        order[messages[post.seq]].append(post.seq)
    for message, seqs in order.items():
        if message is not None:
            assert seqs == sorted(seqs), f"message {message} out of order: {seqs}"


async def test_changing_the_endpoint_checks_the_url_again(world: World, receiver: Receiver) -> None:
    page, _ = await add_endpoint(world, receiver)
    endpoint_id = page.rsplit("/", 1)[1]
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, page)
    before = await world.journal_size()
    refused = await admin.post(
        page + "/edit",
        {"csrf": csrf, "url": "http://169.254.169.254/latest", "description": "x"},
    )
    assert refused.status == 400
    assert "is link-local" in visible(refused.text)
    assert (await world.site.relay.webhooks.get(endpoint_id)).url == receiver.url
    assert await world.journal_size() == before, "a refused change writes nothing"
    unknown = await admin.post(
        page + "/edit", {"csrf": csrf, "url": receiver.url, "event_types": "no.such"}
    )
    assert unknown.status == 400 and "unknown event type" in visible(unknown.text)

    changed = await admin.post(
        page + "/edit",
        {
            "csrf": csrf,
            "url": receiver.url.replace("/hooks", "/moved"),
            "description": "CRM Nord",
            "event_types": "message.received consent.given",
            "thin": "yes",
            "allow_private": "yes",
        },
    )
    assert changed.status == 303 and changed.location == page + "?done=endpoint_changed"
    endpoint = await world.site.relay.webhooks.get(endpoint_id)
    assert endpoint.url.endswith("/moved") and endpoint.thin and endpoint.description == "CRM Nord"
    assert endpoint.event_types == ["message.received", "consent.given"]
    shown = visible((await admin.get(changed.location)).text)
    assert "Endpoint saved." in shown and "thin (ids only)" in shown
    [event] = await world.site.events("webhook.endpoint_changed")
    assert sorted(event.data["changed"]) == ["description", "event_types", "thin", "url"]


async def test_the_endpoint_forms_refuse_bad_input_and_write_nothing(
    world: World, receiver: Receiver
) -> None:
    page, _ = await add_endpoint(world, receiver, "webhook.test")  # no other posts
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, page)
    zone = ZoneInfo(world.site.harness.settings.branding.timezone)
    now = world.site.clock()

    async def queued() -> int:
        return await world.site.count(WebhookDelivery)

    before = (await world.journal_size(), await queued())
    ranges = {
        "reversed": (local(now, zone), local(now - timedelta(hours=1), zone)),
        "empty": (local(now, zone), local(now, zone)),
        "garbage": ("yesterday", local(now, zone)),
        "missing": ("", ""),
    }
    for name, (since, until) in ranges.items():
        answer = await admin.post(
            page + "/replay-range", {"csrf": csrf, "since": since, "until": until}
        )
        assert answer.status == 400, name
        text = visible(answer.text)
        assert "Nothing was queued." in text, (name, text[:300])
        # what was typed stays in the form
        if since:
            assert f'value="{since}"' in answer.text, name

    for test in ("abc", "-1", "1", "9" * 30):  # no test of this endpoint's: no card, no reload
        shown = await admin.get(f"{page}?test={test}")
        assert shown.status == 200, test
        assert "http-equiv" not in shown.text and "Test event" not in visible(shown.text), test

    ghost = "/console/admin/webhooks/no-such-endpoint"
    hour = {"since": local(now - timedelta(hours=1), zone), "until": local(now, zone)}
    for action, form in (
        ("/replay-range", hour),
        ("/test", {}),
        ("/rotate-secret", {}),
        ("/edit", {"url": receiver.url}),
        ("/replay", {"seq": "1"}),
    ):
        answer = await admin.post(ghost + action, {"csrf": csrf, **form})
        assert answer.status == 404, action
    assert (await admin.get(ghost)).status == 404

    auditor = world.consoles[AUDITOR]
    seen = await auditor.get(page)
    assert seen.status == 200 and "At a glance" in visible(seen.text)
    assert "/rotate-secret" not in seen.text and "replay-range" not in seen.text
    auditor_csrf = await world.csrf(AUDITOR)
    for action in ("/replay-range", "/test", "/rotate-secret", "/edit"):
        answer = await auditor.post(page + action, {"csrf": auditor_csrf, "url": receiver.url})
        assert answer.status == 403, action
        without = await admin.post(page + action, {"url": receiver.url})
        assert without.status == 403, f"{action} without the CSRF token"

    endpoint_id = page.rsplit("/", 1)[1]
    await world.site.relay.webhooks.disable(endpoint_id, by="test")
    after_disable = (await world.journal_size(), await queued())
    disabled = await admin.post(page + "/replay-range", {"csrf": csrf, **hour})
    assert disabled.status == 409 and "enable it first" in visible(disabled.text)
    test = await admin.post(page + "/test", {"csrf": csrf})
    assert test.status == 409
    assert (await world.journal_size(), await queued()) == after_disable
    assert after_disable[1] == before[1]


async def test_a_refused_new_endpoint_keeps_what_was_typed(
    world: World, receiver: Receiver
) -> None:
    """The admin corrects the one typo instead of typing the endpoint again."""
    admin = world.consoles[ADMIN]
    csrf = await world.csrf(ADMIN, PAGE)
    before = await world.journal_size()
    typed = {
        "url": receiver.url,
        "description": "CRM <Nord> & Co",
        "event_types": "consent.given downlod.first",
        "thin": "yes",
        "allow_private": "yes",
    }
    refused = await admin.post(PAGE, {"csrf": csrf, **typed})
    assert refused.status == 400
    assert "unknown event type(s): downlod.first; did you mean download.first?" in visible(
        refused.text
    )
    german = await admin.post(PAGE, {"csrf": csrf, **typed}, **speaking("de"))
    assert german.status == 400
    assert (
        "Der Endpunkt konnte nicht gespeichert werden: Unbekannte Ereignistypen: downlod.first;"
        " meinten Sie download.first?" in visible(german.text)
    )
    for name in ("url", "description", "event_types"):
        assert f'name="{name}" type="' in refused.text
        assert f'value="{html.escape(typed[name])}"' in refused.text, name
    for box in ("thin", "allow_private"):
        assert re.search(
            rf'id="{box}" name="{box}" type="checkbox" value="yes" checked>', refused.text
        )
    assert await world.journal_size() == before
