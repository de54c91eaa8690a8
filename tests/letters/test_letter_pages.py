"""The prospect's registered-letter pages over real HTTP, on SQLite and PostgreSQL.

Letters are made the real way: the agent sends "[Exposé] Villa am See" through a running
relay (SMTP, worker and web, with a clock the test can move on), the recording upstream gets
the letter, and the /l/ link is taken from its text.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import hashlib
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import select

from gateway.letters.renewal import request_mail
from gateway.mail import headers, mime
from gateway.mail.own_mail import render
from gateway.store.models import Consent, Delivery, LetterStatus, Message
from gateway.texts.catalog import load_catalogs
from tests.conftest import AGENT
from tests.letter_fixtures import StartSite
from tests.letter_site import (
    BUTTON_DE,
    BUTTON_ES,
    FLOOR_PLAN,
    LOGO_PNG,
    PROSPECT,
    REQUIRED,
    Clock,
    LetterSite,
    assert_security_headers,
    offer,
    text_of,
)
from tests.queue_wait import queue_idle
from tests.support import chained
from web.csrf import FormTokens, load_or_create_key, origin_of
from web.letters import body_of


async def test_get_shows_the_letter_and_records_only_a_view(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    response, body = await site.get(f"/l/{token}", headers={"User-Agent": "Phone/1.0"})
    assert response.status == 200
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert '<html lang="de">' in html
    assert "<script" not in html, "the page needs no JavaScript"
    assert "Villa am See" in text and "[Exposé]" not in text
    assert f"Anna Agent ({AGENT})" in text
    assert "Müller &amp; Söhne Immobilien" in html
    for title in (
        "Widerrufsbelehrung",
        "Beginn vor Ablauf der Widerrufsfrist",
        "Maklerbedingungen und Provision",
        "Datenschutzhinweise",
    ):
        assert title in text
    assert "Muster-Widerrufsformular" in text  # the full text, not a summary
    assert "Seestraße 1, 82319 Starnberg" in text  # placeholders filled
    for block in REQUIRED:
        assert f'name="{block}"' in html and f'for="check-{block}"' in html
    assert 'name="privacy"' not in html, "an informational block has nothing to tick"
    assert "Ich verlange ausdrücklich" in text
    assert html.count("erforderlich</span>") == 3
    # § 312j (3) BGB: the button says exactly what the block set says, nothing else
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_DE
    assert " required" not in html, "the server judges, not the browser"
    assert re.search(r'name="csrf" value="[0-9a-f]{64}"', html)

    response, _ = await site.request("HEAD", f"/l/{token}")
    assert response.status == 200

    view, head = await site.events("letter.viewed")
    assert head.data["automated"] is True and head.data["automated_reasons"] == ["HEAD request"]
    letter = await site.letter_row()
    assert view.message_id == letter.message_id
    assert view.data == {
        "letter_id": letter.id,
        "recipient": PROSPECT,
        "ip": "127.0.0.1",
        "user_agent": "Phone/1.0",
    }
    types = [event.type for event in await site.events()]
    assert "consent.given" not in types and "letter.released" not in types
    assert letter.status == LetterStatus.HELD
    assert await site.count(Consent) == 0
    await queue_idle(site.relay.db)  # a wrongly queued copy would have arrived by now
    assert [m.rcpt_tos for m in site.sink.messages] == [[PROSPECT]]


async def test_the_page_speaks_the_letters_language(site: LetterSite) -> None:
    token, _ = await site.send_offer(offer(language="es"))
    response, body = await site.get(f"/l/{token}", headers={"Accept-Language": "de"})
    html = body.decode()
    assert response.status == 200 and '<html lang="es">' in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_ES
    assert "Sus declaraciones" in html and "Parte 1 de 4" in html


async def test_post_without_csrf_or_from_elsewhere_is_403(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    boxes = dict.fromkeys(REQUIRED, "yes")
    before = len(await site.events())
    attempts = [
        ({**boxes}, {}),
        ({"csrf": "0" * 64, **boxes}, {}),
        ({"csrf": csrf[:-1], **boxes}, {}),
        ({"csrf": csrf, **boxes}, {"Origin": "https://evil.example"}),
        ({"csrf": csrf, **boxes}, {"Origin": "null"}),
        ({"csrf": csrf, **boxes}, {"Origin": site.url.replace("127.0.0.1", "localhost")}),
    ]
    for fields, extra in attempts:
        response, body = await site.post(f"/l/{token}", fields, headers=extra)
        assert response.status == 403, (fields, extra)
        assert "Anfrage nicht bestätigt" in body.decode()
        assert_security_headers(response)
    assert len(await site.events()) == before
    assert await site.count(Consent) == 0
    assert (await site.letter_row()).status == LetterStatus.HELD

    # a form of another letter does not fit this one
    other, _ = await site.send_offer(recipient="omar@example.org")
    response, _ = await site.post(f"/l/{token}", {"csrf": await site.csrf(other), **boxes})
    assert response.status == 403

    # the right origin (as browsers send it) is accepted
    response, _ = await site.post(
        f"/l/{token}", {"csrf": csrf, **boxes}, headers={"Origin": site.url}
    )
    assert response.status == 303


async def test_missing_boxes_show_the_page_again_and_write_nothing(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    before = len(await site.events())
    response, body = await site.post(f"/l/{token}", {"csrf": csrf, "withdrawal": "yes"})
    assert response.status == 422
    html, text = body.decode(), text_of(body)
    assert "Es fehlen noch Erklärungen" in text
    summary = html[
        html.index('role="alert"') : html.index("</section>", html.index('role="alert"'))
    ]
    assert "Beginn vor Ablauf der Widerrufsfrist" in summary
    assert "Maklerbedingungen und Provision" in summary
    assert "Widerrufsbelehrung" not in summary
    assert re.search(r'name="withdrawal" value="yes" checked', html)
    assert re.search(r'name="terms" value="yes" aria-invalid="true"', html)
    assert re.search(r'name="early-start" value="yes" aria-invalid="true"', html)
    assert text.count("Bitte kreuzen Sie diese Erklärung an.") == 2
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == BUTTON_DE

    response, _ = await site.post(f"/l/{token}", {"csrf": csrf})
    assert response.status == 422
    assert len(await site.events()) == before
    assert await site.count(Consent) == 0


async def test_consent_releases_and_the_offer_shows_body_and_attachments(
    site: LetterSite,
) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    response = await site.consent(token)
    assert response.status == 303
    assert response.headers["Location"] == f"/l/{token}/offer"

    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert "Villa am See" in text and f"Anna Agent ({AGENT})" in text
    assert "hier ist das Exposé zur Villa am See" in text
    assert "<b>Exposé</b>" in html, "the HTML body is shown as HTML"
    assert "<title>" not in html.split("</head>", 1)[1]
    assert "Grundriss Erdgeschoss.pdf" in text
    # the large PDF was linked in the held copy: the body carries its download link
    assert f"{site.url}/d/" in html
    assert "Exposé Villa am See.pdf" in text
    # the inline logo is served from here; nothing loads from elsewhere
    [logo] = re.findall(rf'<img src="(/l/{token}/a/[0-9.]+)" alt="Logo">', html)
    response, data = await site.get(logo)
    assert response.status == 200 and data == LOGO_PNG
    assert response.headers["Content-Type"] == "image/png"

    [attachment] = re.findall(rf'href="(/l/{token}/a/[0-9.]+)"', html)
    response, data = await site.get(attachment)
    assert response.status == 200 and data == FLOOR_PLAN
    assert_security_headers(response)
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="Grundriss Erdgeschoss.pdf";'
        " filename*=UTF-8''Grundriss%20Erdgeschoss.pdf"
    )
    response, data = await site.request("HEAD", attachment)
    assert response.status == 200 and data == b""
    assert response.headers["Content-Length"] == str(len(FLOOR_PLAN))
    response, _ = await site.get(f"/l/{token}/a/99")
    assert response.status == 404

    response, pdf = await site.get(f"/l/{token}/consent.pdf")
    assert response.status == 200 and pdf.startswith(b"%PDF")
    assert response.headers["Content-Type"] == "application/pdf"
    assert "Erkl%C3%A4rungen%20Villa%20am%20See.pdf" in response.headers["Content-Disposition"]
    async with site.relay.db.transaction() as session:
        [consent] = (await session.scalars(select(Consent))).all()
    assert hashlib.sha256(pdf).hexdigest() == consent.pdf_blob
    assert sorted(consent.checked) == sorted(REQUIRED)
    assert consent.ip == "127.0.0.1"

    # the prospect gets the original, the agent the confirmation
    arrived = await site.sink.expect(3)
    assert sorted(m.rcpt_tos[0] for m in arrived) == sorted([PROSPECT, PROSPECT, AGENT])

    # a second POST changes nothing and leads to the offer again
    response, _ = await site.post(f"/l/{token}", {"csrf": csrf, "terms": "yes"})
    assert response.status == 303 and response.headers["Location"] == f"/l/{token}/offer"
    assert await site.count(Consent) == 1
    types = [event.type for event in await site.events()]
    assert types.count("consent.given") == 1 and types.count("letter.released") == 1

    # the letter link now shows a short page, and still records the view
    views = len(await site.events("letter.viewed"))
    response, body = await site.get(f"/l/{token}")
    assert response.status == 200
    html = body.decode()
    assert "Sie haben das Exposé bereits geöffnet" in html
    assert f'href="/l/{token}/offer"' in html and f'href="/l/{token}/consent.pdf"' in html
    assert "<button" not in html
    assert len(await site.events("letter.viewed")) == views + 1
    assert (await chained(site.relay.db)).ok


async def test_concurrent_posts_release_exactly_once(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    fields = {"csrf": csrf, **dict.fromkeys(REQUIRED, "yes")}
    answers = await asyncio.gather(*(site.post(f"/l/{token}", fields) for _ in range(5)))
    assert [response.status for response, _ in answers] == [303] * 5
    letter = await site.letter_row()
    assert letter.status == LetterStatus.RELEASED
    assert await site.count(Consent) == 1
    # one released copy to the prospect (besides the letter), one confirmation to the agent
    assert (
        await site.count(
            Delivery, Delivery.message_id == letter.message_id, Delivery.blob != letter.letter_blob
        )
        == 1
    )
    assert await site.count(Delivery, Delivery.recipient == AGENT) == 1
    assert len(await site.events("consent.given")) == 1
    assert len(await site.events("letter.released")) == 1
    arrived = await site.sink.expect(3)
    await queue_idle(site.relay.db)
    assert len(site.sink.messages) == len(arrived) == 3


async def test_offer_and_files_wait_for_the_consent(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    for path in ("/offer", "/consent.pdf", "/a/2"):
        response, _ = await site.get(f"/l/{token}{path}")
        assert response.status == 303, path
        assert response.headers["Location"] == f"/l/{token}"
    assert await site.events("letter.viewed") == []


async def test_unknown_tokens_get_the_friendly_404(site: LetterSite) -> None:
    fake = "A" * 43
    for method, path in [
        ("GET", f"/l/{fake}"),
        ("GET", f"/l/{fake}/offer"),
        ("GET", f"/l/{fake}/consent.pdf"),
        ("GET", f"/l/{fake}/a/1"),
        ("POST", f"/l/{fake}"),
        ("POST", f"/l/{fake}/renew"),
        ("GET", "/l/"),
        ("GET", "/l/../etc/passwd"),
    ]:
        response, body = await site.request(method, path, headers={"Accept-Language": "en"})
        assert response.status == 404, (method, path)
        assert "Link not found" in body.decode()
        assert_security_headers(response)
    assert await site.events("letter.viewed") == []


async def test_released_offer_stays_available_after_the_link_expired(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    assert (await site.consent(token)).status == 303
    clock.advance(days=30)
    for path in ("/offer", "/consent.pdf"):
        response, _ = await site.get(f"/l/{token}{path}")
        assert response.status == 200, path


# --- expired letters and the request for a new link -----------------------------------------


async def test_expired_letter_offers_to_ask_the_agent_once_a_day(
    site: LetterSite, clock: Clock
) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    clock.advance(days=14, seconds=1)

    response, body = await site.get(f"/l/{token}")
    assert response.status == 410
    assert_security_headers(response)
    html, text = body.decode(), text_of(body)
    assert '<html lang="de">' in html
    assert "Dieser Link ist abgelaufen" in text and "Villa am See" in text
    assert f'action="/l/{token}/renew"' in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == "Anna Agent um einen neuen Link bitten"
    assert len(await site.events("letter.viewed")) == 1, "an expired letter records no view"

    # consenting is over: 410, nothing written
    response, _ = await site.post(f"/l/{token}", {"csrf": csrf, **dict.fromkeys(REQUIRED, "y")})
    assert response.status == 410
    assert await site.count(Consent) == 0

    response, _ = await site.post(f"/l/{token}/renew", {})
    assert response.status == 403
    response, _ = await site.post(
        f"/l/{token}/renew", {"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert response.status == 403
    assert await site.events("letter.renewal_requested") == []

    for _ in range(2):
        response, body = await site.post(f"/l/{token}/renew", {"csrf": csrf})
        assert response.status == 200
        assert "Wir haben Anna Agent gebeten" in text_of(body)
    requests = await site.sink.expect(2)
    await queue_idle(site.relay.db)
    to_agent = [m for m in site.sink.messages if m.rcpt_tos == [AGENT]]
    assert len(requests) == 2 and len(to_agent) == 1
    mail = to_agent[0]
    assert mail.mail_from in ("", "<>")  # the null sender
    fields = headers.fields_of(mail.data)
    assert headers.decoded(headers.first_value(fields, "subject") or "") == (
        f"Neuer Link erbeten: Villa am See – {PROSPECT}"
    )
    assert headers.first_value(fields, "auto-submitted") == "auto-generated"
    assert headers.addresses(fields, "from") == ["postmaster@broker.example"]  # signed
    assert headers.addresses(fields, "reply-to") == [PROSPECT]
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert not parsed.defects
    body_text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert PROSPECT in body_text and "„Villa am See“" in body_text

    [event] = await site.events("letter.renewal_requested")
    letter = await site.letter_row()
    assert event.data["letter_id"] == letter.id and event.data["ip"] == "127.0.0.1"
    assert event.message_id == letter.message_id
    # where one step sends the same letter again
    assert f"{site.url}/console/messages/{letter.message_id}" in body_text.splitlines()
    async with site.relay.db.transaction() as session:
        [request_message] = (
            await session.scalars(
                select(Message).where(Message.id == event.data["request_message_id"])
            )
        ).all()
    assert request_message.kind == "confirmation" and request_message.sender == ""

    # a day later the prospect may ask again
    clock.advance(hours=24, seconds=1)
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 200
    await site.sink.expect(3)
    assert len(await site.events("letter.renewal_requested")) == 2


async def test_renew_of_a_valid_letter_leads_back_to_it(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    response, _ = await site.post(f"/l/{token}/renew", {"csrf": csrf})
    assert response.status == 303 and response.headers["Location"] == f"/l/{token}"
    assert await site.events("letter.renewal_requested") == []


async def test_concurrent_renewals_send_one_mail(site: LetterSite, clock: Clock) -> None:
    token, _ = await site.send_offer()
    csrf = await site.csrf(token)
    clock.advance(days=15)
    answers = await asyncio.gather(
        *(site.post(f"/l/{token}/renew", {"csrf": csrf}) for _ in range(4))
    )
    assert [response.status for response, _ in answers] == [200] * 4
    assert len(await site.events("letter.renewal_requested")) == 1
    assert await site.count(Delivery, Delivery.recipient == AGENT) == 1


def test_renewal_mail_keeps_every_value_on_one_line() -> None:
    catalog = load_catalogs()["de"]
    now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    mail = request_mail(
        catalog,
        console="https://relay.broker.example/console/messages/0190aa55bb66cc77dd88",
        agent=AGENT,
        recipient=PROSPECT,
        subject="Villa\r\nBcc: victim@example.com\u2028am See " + "ä" * 200,
        expired_on=now,
    )
    raw = render(mail, sender="postmaster@broker.example", hostname="relay.broker.example", now=now)
    fields = headers.fields_of(raw)
    assert headers.values(fields, "bcc") == []
    subject = headers.decoded(headers.first_value(fields, "subject") or "")
    assert subject.startswith("Neuer Link erbeten: Villa Bcc: victim@example.com am See ä")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    assert "23.11.2026" in parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]


# --- escaping and sanitizing ----------------------------------------------------------------


def hostile_block_set(directory: Path) -> Path:
    for language in ("de", "en", "es"):
        folder = directory / language
        folder.mkdir(parents=True)
        (folder / "text.md").write_text(
            "Text mit <script>alert(1)</script> und <b onclick=x()>HTML</b>\n\n"
            "[Link](javascript:alert(2))\n",
            encoding="utf-8",
        )
        (folder / "blocks.toml").write_text(
            'button = "Kostenpflichtig <i>bestellen</i>"\n'
            'letter_subject = "Exposé: {subject}"\n'
            'intro = "Hallo"\nlink_label = "Öffnen"\noutro = "Gruß"\n'
            "[[block]]\n"
            'id = "terms"\n'
            'title = "Bedingungen <img src=x onerror=alert(3)>"\n'
            'file = "text.md"\n'
            'checkbox = "Ich <u>stimme</u> zu"\n',
            encoding="utf-8",
        )
    return directory


async def test_html_in_subject_and_blocks_is_escaped_and_scripts_removed(
    site_factory: StartSite,
    tmp_path: Path,
) -> None:
    blocks = hostile_block_set(tmp_path / "hostile")
    site = await site_factory(
        letter={"block_sets": {"hostile": str(blocks)}},
        policy={"letter_block_set": "hostile"},
    )
    body_html = (
        "<html><head><style>p{color:red}</style><script>steal()</script></head>"
        '<body onload="steal()"><p onclick="steal()" style="color:red">Willkommen</p>'
        '<img src="https://tracker.example/pixel.gif" alt="pixel">'
        '<a href="javascript:steal()">klick</a> <a href="https://broker.example/">Web</a>'
        '<iframe src="https://evil.example/"></iframe><form action="https://evil.example/">'
        '<input name="pw"></form><svg onload="steal()"></svg></body></html>'
    )
    raw = offer(
        subject='[Exposé] <b>Villa</b> <script>alert("s")</script>',
        html=body_html,
        big=False,
    )
    token, _ = await site.send_offer(raw)
    response, body = await site.get(f"/l/{token}")
    assert response.status == 200
    html = body.decode()
    assert "<script" not in html
    assert "&lt;b&gt;Villa&lt;/b&gt; &lt;script&gt;alert(&#34;s&#34;)&lt;/script&gt;" in html
    assert "Bedingungen &lt;img src=x onerror=alert(3)&gt;" in html
    assert "Ich &lt;u&gt;stimme&lt;/u&gt; zu" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "onclick" not in html.replace("&lt;b onclick=x()&gt;", "")
    assert 'href="javascript:' not in html and "[Link](javascript:alert(2))" in html
    [button] = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert button == "Kostenpflichtig &lt;i&gt;bestellen&lt;/i&gt;"

    assert (await site.consent(token, ("terms",))).status == 303
    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200
    html = body.decode()
    main = html[html.index("<main") :]
    assert "Willkommen" in main and 'href="https://broker.example/"' in main
    for banned in (
        "<script",
        "steal()",
        "onload",
        "onclick",
        "style=",
        "<style",
        "tracker.example",
        "<iframe",
        '<form action="https',
        "<input",
        "javascript:",
        "<svg onload",
    ):
        assert banned not in main, banned
    assert '<img alt="pixel">' in main, "external images are not loaded"
    assert "&lt;b&gt;Villa&lt;/b&gt;" in html


# --- CSRF pieces ----------------------------------------------------------------------------


def test_secret_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"
    first = FormTokens(path, "https://makler.example/")
    second = FormTokens(path, "https://makler.example")
    token = "t" * 43
    assert first.token_for(token) == second.token_for(token)
    assert first.valid(token, second.token_for(token))
    assert not first.valid(token, None) and not first.valid(token, "")
    assert not first.valid("u" * 43, first.token_for(token))
    (tmp_path / "short.key").write_bytes(b"x" * 8)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_or_create_key(tmp_path / "short.key")


def test_origins_compare_as_browsers_write_them() -> None:
    tokens = FormTokens(Path("/nonexistent"), "https://Makler.Example:443/sealrelay")
    assert tokens.origin == "https://makler.example"
    assert tokens.origin_allowed(None)
    assert tokens.origin_allowed("https://makler.example")
    assert not tokens.origin_allowed("http://makler.example")
    assert not tokens.origin_allowed("https://makler.example.evil.example")
    assert not tokens.origin_allowed("null")
    assert not tokens.origin_allowed("")
    assert origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert origin_of("http://[2001:db8::1]:80") == "http://[2001:db8::1]"


async def test_the_key_lives_beside_the_blob_store(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    await site.csrf(token)
    path = site.harness.settings.storage.path.parent / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32


@pytest.mark.parametrize(
    ("charset", "body", "shown"),
    [
        ("utf-8", "Preis: 450.000 € „verhandelbar“".encode(), "Preis: 450.000 € „verhandelbar“"),
        ("iso-8859-1", "Preis: 450.000 € „VB“".encode("cp1252"), "Preis: 450.000 € „VB“"),
        ('"US-ASCII"', "Grüße".encode("cp1252"), "Grüße"),
        (None, "Grüße €".encode(), "Grüße €"),
        (None, "Grüße €".encode("cp1252"), "Grüße €"),
        ("x-unknown", "Grüße".encode("cp1252"), "Grüße"),
        ("koi8-r", "Привет".encode("koi8-r"), "Привет"),
    ],
)
def test_the_offer_body_is_read_as_a_browser_reads_its_charset(
    charset: str | None, body: bytes, shown: str
) -> None:
    """Outlook labels Windows-1252 as ISO-8859-1; a label-less or unknown 8-bit body is
    UTF-8 when it can be, else the code page of the mail programs that wrote it."""
    label = f"; charset={charset}" if charset else ""
    raw = (
        (
            f"From: {AGENT}\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain{label}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
    )
    html, text = body_of(raw, mime.parse(raw))
    assert html is None and text == shown + "\r\n"


async def test_the_offer_lists_a_forwarded_message_under_its_subject(site: LetterSite) -> None:
    """A forwarded message attached without a name is offered as the download links offer
    it: by its Subject, as an email, served as it was attached."""
    inner = email.message.EmailMessage()
    inner["From"] = "Hausverwaltung <hv@verwaltung.example>"
    inner["Subject"] = "=?utf-8?q?Protokoll_Eigent=C3=BCmerversammlung_2026?="
    inner.set_content("Anbei das Protokoll.\n")
    message = email.message_from_bytes(offer(big=False), policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    message.add_attachment(inner)
    token, _ = await site.send_offer(message.as_bytes(policy=email.policy.SMTP))
    await site.csrf(token)
    assert (await site.consent(token)).status == 303
    response, body = await site.get(f"/l/{token}/offer")
    assert response.status == 200
    html, text = body.decode(), text_of(body)
    name = "Protokoll Eigentümerversammlung 2026.eml"
    assert name in text and "E-Mail, " in text and "attachment-" not in text
    [path] = re.findall(
        rf'href="(/l/{token}/a/[0-9.]+)"[^>]*>\s*<span class="file-badge"[^>]*>EML', html
    )
    response, data = await site.get(path)
    assert response.status == 200 and b"Anbei das Protokoll." in data
    assert response.headers["Content-Disposition"].endswith("''" + quote(name, safe=""))
