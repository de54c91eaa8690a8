"""End to end: large attachments become personal, tracked links (issue 3's scenario).

A real client sends through the relay to a recording upstream; the links in the copies are
fetched over real HTTP. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
from email.message import EmailMessage
from urllib.parse import quote, unquote

import aiohttp
import aiosmtplib
import dkim as dkimpy
import pytest
from sqlalchemy import select

from gateway.mail import headers
from gateway.store import blob_audit
from gateway.store.models import Event, Message, utcnow
from sealrelay.serve import blob_horizon
from tests.conftest import AGENT, Harness, StartRelay, dkim_dns
from tests.mail import tnef_stream
from tests.support import PERSON_UA, chained

PROSPECT = "prospect@example.com"
OTHER = "other@example.org"
COLLEAGUE = "ben@broker.example"
PDF = os.urandom(8 * 1024 * 1024)
TEXT = b"Energieausweis: B\r\n" * 55
ICS = (
    b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nSUMMARY:Besichtigung\r\n"
    b"DTSTART:20261201T100000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)
LINK = re.compile(r"http://127\.0\.0\.1:8080/d/([A-Za-z0-9_-]{43})")


def offer() -> bytes:
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = f"Paula Prospect <{PROSPECT}>"
    message["Cc"] = f"{OTHER}, Ben <{COLLEAGUE}>"
    message["Subject"] = "Ihr Exposé: Müllerstraße 12"
    message["Message-ID"] = "<offer-1@broker.example>"
    message["References"] = "<inquiry-7@example.com>"
    message.set_content("Guten Tag,\n\nanbei das Exposé.\n\nAnna\n")
    message.add_alternative(
        "<html><body><p>Guten Tag,</p><p>anbei das Exposé.</p></body></html>", subtype="html"
    )
    message.add_attachment(
        PDF, maintype="application", subtype="pdf", filename="Exposé Müllerstraße.pdf"
    )
    message.add_attachment(TEXT, maintype="text", subtype="plain", filename="energie.txt")
    message.add_attachment(ICS, maintype="text", subtype="calendar", filename="termin.ics")
    return message.as_bytes(policy=email.policy.SMTP)


def top_field(raw: bytes, name: str) -> bytes:
    [field] = [f.raw for f in headers.fields_of(raw) if f.name == name]
    return field


def attachments(raw: bytes) -> dict[str, bytes]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    return {
        part.get_filename(): part.get_payload(decode=True)  # type: ignore[misc]
        for part in parsed.iter_attachments()
    }


def bodies(raw: bytes) -> tuple[str, str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


@pytest.fixture
async def relay(relay_factory: StartRelay) -> Harness:
    return await relay_factory(
        smtp={"max_message_size": 50 * 1024 * 1024},
        policy={"internal_domains": ["broker.example"]},
    )


async def test_large_attachment_becomes_a_personal_link(relay: Harness) -> None:
    original = offer()
    await relay.send(original, recipients=[PROSPECT, OTHER, COLLEAGUE])
    copies = {copy.rcpt_tos[0]: copy.data for copy in await relay.sink.expect(3)}
    assert sorted(copies) == sorted([PROSPECT, OTHER, COLLEAGUE])

    # The colleague gets the original: only trace and signature fields in front of it.
    assert copies[COLLEAGUE].endswith(original)

    tokens = {}
    for recipient in (PROSPECT, OTHER):
        copy = copies[recipient]
        assert dkimpy.verify(copy, dnsfunc=dkim_dns(relay.dkim_key))
        for name in ("to", "cc", "subject", "message-id", "references", "from"):
            assert top_field(copy, name) == top_field(original, name), name
        files = attachments(copy)
        assert "Exposé Müllerstraße.pdf" not in files
        assert files["termin.ics"] == ICS
        assert files["energie.txt"] == TEXT
        text, html = bodies(copy)
        assert "anbei das Exposé" in text and "Exposé Müllerstraße.pdf" in text
        [token] = set(LINK.findall(text))
        assert token in html and "Dateien herunterladen" in html
        tokens[recipient] = token
        assert len(copy) < 100_000
    assert tokens[PROSPECT] != tokens[OTHER]

    base = relay.web_url
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        for token in tokens.values():
            async with http.get(f"{base}/d/{token}") as page:
                assert page.status == 200
                html_page = await page.text()
            assert "Exposé Müllerstraße.pdf" in html_page
            [file_path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', html_page)
            for _ in range(2):
                async with http.get(f"{base}{file_path}") as download:
                    assert download.status == 200
                    body = await download.read()
                assert hashlib.sha256(body).digest() == hashlib.sha256(PDF).digest()

    assert (await chained(relay.relay.db)).ok
    async with relay.relay.db.transaction() as session:
        events = (await session.scalars(select(Event).order_by(Event.id))).all()
        messages = (await session.scalars(select(Message))).all()
    for recipient in (PROSPECT, OTHER):
        downloads = [
            e.type
            for e in events
            if e.type.startswith("download.") and e.data.get("recipient") == recipient
        ]
        assert downloads == ["download.first", "download.repeat"], recipient
    created = [e.data["recipient"] for e in events if e.type == "link.created"]
    assert sorted(created) == sorted([PROSPECT, OTHER])
    kept = [e.data for e in events if e.type == "policy.kept"]
    assert kept == [{"recipient": COLLEAGUE, "reason": "internal recipient"}]
    # The stored original is the bytes the agent sent.
    [message] = messages
    assert await relay.relay.blobs.read(message.blob) == original


async def test_language_header_picks_the_block_and_never_leaves(relay: Harness) -> None:
    raw = offer().replace(b"Subject:", b"X-Sealrelay-Language: es\r\nSubject:", 1)
    await relay.send(raw, recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    assert b"X-Sealrelay-Language" not in copy.data
    text, _ = bodies(copy.data)
    assert "Tiene 1 archivo disponible" in text


async def test_small_mail_goes_out_unchanged(relay: Harness) -> None:
    small = email.message_from_bytes(offer(), policy=email.policy.SMTP)
    for part in small.iter_attachments():
        if part.get_filename() == "Exposé Müllerstraße.pdf":
            part.set_content(
                b"%PDF-1.4 small",
                maintype="application",
                subtype="pdf",
                filename="Exposé Müllerstraße.pdf",
            )
    data = small.as_bytes(policy=email.policy.SMTP)
    await relay.send(data, recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(data)


async def test_unsafe_mime_is_refused_before_250(relay: Harness) -> None:
    nested = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        for i in range(30)
    )
    raw = f"From: {AGENT}\r\nTo: {PROSPECT}\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".encode()
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await relay.send(raw + nested + b"x\r\n", recipients=[PROSPECT])
    assert refused.value.code == 554
    assert "5.6.0" in refused.value.message and "20 levels" in refused.value.message
    async with relay.relay.db.transaction() as session:
        assert (await session.scalars(select(Message))).all() == []
    assert relay.sink.messages == []


def forwarded(name: str | None) -> tuple[bytes, bytes]:
    """An agent's mail with an inquiry forwarded as an attachment, named or (as some clients
    attach it) not; and the forwarded message's bytes."""
    inner = EmailMessage()
    inner["From"] = "Notar Weber <weber@notariat.example>"
    inner["To"] = AGENT
    inner["Subject"] = "=?utf-8?q?Grundbuchauszug_M=C3=BCllerstra=C3=9Fe_12?="
    inner.set_content("Anbei der Auszug.\n")
    inner.add_attachment(PDF, maintype="application", subtype="pdf", filename="auszug.pdf")
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = PROSPECT
    message["Subject"] = "WG: Grundbuchauszug"
    message.set_content("Guten Tag,\n\nanbei weitergeleitet.\n")
    message.add_attachment(inner)
    if name is not None:
        [part] = message.iter_attachments()
        part.replace_header("Content-Disposition", f'attachment; filename="{name}"')
    raw = message.as_bytes(policy=email.policy.SMTP)
    [part] = email.message_from_bytes(raw, policy=email.policy.default).iter_attachments()
    return raw, part.get_payload(0).as_bytes(policy=email.policy.SMTP)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("given", "shown"),
    [(None, "Grundbuchauszug Müllerstraße 12.eml"), ("Anfrage.eml", "Anfrage.eml")],
)
async def test_a_forwarded_message_is_linked_under_its_subject(
    relay: Harness, given: str | None, shown: str
) -> None:
    """Not as "attachment-2.eml": the prospect sees what the mail is about, and the file
    saved is the forwarded message as it was attached."""
    raw, inner = forwarded(given)
    await relay.send(raw, recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    body_part = email.message_from_bytes(copy.data, policy=email.policy.default).get_body()
    assert body_part is not None
    text = body_part.get_content()
    assert f"  - {shown} (" in text and "attachment-" not in text
    [token] = set(LINK.findall(text))
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(f"{relay.web_url}/d/{token}") as page:
            assert page.status == 200
            html_page = await page.text()
        assert shown in html_page and "E-Mail, " in html_page
        [file_path] = re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', html_page)
        async with http.get(f"{relay.web_url}{file_path}") as download:
            assert download.status == 200
            disposition = download.headers["Content-Disposition"]
            body = await download.read()
    assert disposition.endswith("''" + quote(shown, safe="")), disposition
    assert body.replace(b"\r\n", b"\n") == inner.replace(b"\r\n", b"\n")


async def test_a_large_picture_in_the_body_stays_where_the_html_shows_it(
    relay: Harness,
) -> None:
    """The PDF beside it is linked; the photo the HTML shows by cid: goes along, with its
    Content-ID, even though the mailer (Python's add_related) called it an attachment."""
    photo = os.urandom(3 * 1024 * 1024)
    message = EmailMessage()
    message["From"] = f"Anna Agent <{AGENT}>"
    message["To"] = PROSPECT
    message["Subject"] = "Objektfoto Müllerstraße 12"
    message.set_content("Guten Tag,\n\nhier das Foto.\n")
    message.add_alternative(
        '<html><body><p>Guten Tag,</p><img src="cid:photo@broker"></body></html>',
        subtype="html",
    )
    message.get_payload()[1].add_related(  # type: ignore[index]
        photo, "image", "jpeg", cid="<photo@broker>", filename="foto.jpg"
    )
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="Exposé.pdf")
    await relay.send(message.as_bytes(policy=email.policy.SMTP), recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
    [shown] = [part for part in parsed.walk() if part["Content-ID"] == "<photo@broker>"]
    assert shown.get_payload(decode=True) == photo
    text, html = bodies(copy.data)
    assert '<img src="cid:photo@broker">' in html
    assert "Exposé.pdf" in text and "foto.jpg" not in text and "foto.jpg" not in html
    assert all(part.get_filename() != "Exposé.pdf" for part in parsed.walk())


async def test_the_blob_audit_finds_what_a_lost_file_takes_from_the_links(relay: Harness) -> None:
    """What `sealrelay verify --blobs` reads: every blob the sweep would keep is looked up."""
    await relay.send(offer(), recipients=[PROSPECT])
    await relay.sink.expect(1)
    horizon = blob_horizon(relay.settings, utcnow())
    whole = await blob_audit.audit(relay.relay.db, relay.relay.blobs, horizon)
    assert whole.missing == [] and whole.checked >= 2  # the original and the linked PDF
    linked = hashlib.sha256(PDF).hexdigest()
    await relay.relay.blobs.delete(linked)
    after = await blob_audit.audit(relay.relay.db, relay.relay.blobs, horizon)
    assert [(m.column, m.digest) for m in after.missing] == [("files.sha256", linked)]
    assert after.checked == whole.checked


def outlook_rich_text(winmail: bytes) -> bytes:
    return tnef_stream.outlook_mail(
        winmail,
        sender=f"Anna Agent <{AGENT}>",
        to=PROSPECT,
        subject="Exposé Müllerstraße 12",
        text="Guten Tag,\n\nanbei Exposé und Grundriss.\n",
    )


async def linked_files(relay: Harness, copy: bytes) -> dict[str, bytes]:
    """What the prospect can download from the copy's link, by the name the page shows."""
    body_part = email.message_from_bytes(copy, policy=email.policy.default).get_body()
    assert body_part is not None
    [token] = set(LINK.findall(body_part.get_content()))
    files = {}
    async with aiohttp.ClientSession(headers={"User-Agent": PERSON_UA}) as http:
        async with http.get(f"{relay.web_url}/d/{token}") as page:
            assert page.status == 200
            html_page = await page.text()
        for path in re.findall(rf'href="(/d/{token}/f/[0-9a-f]+)"', html_page):
            async with http.get(f"{relay.web_url}{path}") as download:
                assert download.status == 200
                [name] = re.findall(
                    r"filename\*=UTF-8''(.+)$", download.headers["Content-Disposition"]
                )
                files[unquote(name)] = await download.read()
    return files


async def prospects_copy(relay: Harness, original: bytes) -> bytes:
    """Sent to a prospect and a colleague: the colleague's copy is what Outlook sent, the
    prospect's is signed; the prospect's is returned."""
    await relay.send(original, recipients=[PROSPECT, COLLEAGUE])
    copies = {copy.rcpt_tos[0]: copy.data for copy in await relay.sink.expect(2)}
    assert copies[COLLEAGUE].endswith(original)
    assert dkimpy.verify(copies[PROSPECT], dnsfunc=dkim_dns(relay.dkim_key))
    return copies[PROSPECT]


async def test_a_winmail_dat_goes_to_the_prospect_as_the_files_it_carries(relay: Harness) -> None:
    """A phone cannot open winmail.dat: the big PDF inside is linked by its name, the plan
    beside it attached, the contact card too. The colleague gets what Outlook sent."""
    plan = os.urandom(200_000)
    card = b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Anna Agent\r\nEND:VCARD\r\n"
    winmail = tnef_stream.stream(
        [
            tnef_stream.Attachment(PDF, title="EXPOSE~1.PDF", long_filename="Exposé.pdf"),
            tnef_stream.Attachment(plan, title="Grundriss.png"),
            tnef_stream.Attachment(card, title="anna.vcf", mime_tag="text/vcard"),
        ]
    )
    original = outlook_rich_text(winmail)
    copy = await prospects_copy(relay, original)
    assert attachments(copy) == {"Grundriss.png": plan, "anna.vcf": card}
    body = email.message_from_bytes(copy, policy=email.policy.default).get_body()
    assert body is not None
    text = body.get_content()
    assert "Exposé.pdf" in text and "winmail" not in text and "Grundriss.png" not in text
    assert await linked_files(relay, copy) == {"Exposé.pdf": PDF}
    async with relay.relay.db.transaction() as session:
        events = (await session.scalars(select(Event).order_by(Event.id))).all()
    [unpacked] = [e for e in events if e.type == "winmail.unpacked"]
    assert unpacked.data == {"files": ["Exposé.pdf", "Grundriss.png", "anna.vcf"]}
    [created] = [e for e in events if e.type == "link.created"]
    assert created.data["files"] == ["Exposé.pdf"]
    assert (await chained(relay.relay.db)).ok


async def test_a_small_winmail_dat_reaches_the_prospect_as_its_files(relay: Harness) -> None:
    """Nothing to link, yet the prospect's phone gets the PDF, not winmail.dat; the text and
    every field stay as Outlook wrote them. The colleague gets what Outlook sent."""
    pdf = b"%PDF-1.4 small offer\r\n"
    winmail = tnef_stream.stream([tnef_stream.Attachment(pdf, title="Angebot.pdf")])
    original = outlook_rich_text(winmail)
    copy = await prospects_copy(relay, original)
    assert attachments(copy) == {"Angebot.pdf": pdf}
    assert b"winmail" not in copy and b"ms-tnef" not in copy
    head, _, _ = original.partition(b"\r\n\r\n")
    assert head in copy  # every field of the agent's, byte for byte
    body = email.message_from_bytes(copy, policy=email.policy.default).get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == "Guten Tag,\n\nanbei Exposé und Grundriss.\n"
    async with relay.relay.db.transaction() as session:
        events = (await session.scalars(select(Event).order_by(Event.id))).all()
    [unpacked] = [e for e in events if e.type == "winmail.unpacked"]
    assert unpacked.data == {"files": ["Angebot.pdf"]}
    assert [e.data["recipient"] for e in events if e.type == "delivery.queued"] == [
        PROSPECT,
        COLLEAGUE,
    ]
    assert (await chained(relay.relay.db)).ok


async def test_unpack_winmail_off_leaves_an_otherwise_unchanged_copy_alone(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(policy={"unpack_winmail": False})
    winmail = tnef_stream.stream([tnef_stream.Attachment(b"%PDF small", title="a.pdf")])
    original = outlook_rich_text(winmail)
    await relay.send(original, recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(original)
    async with relay.relay.db.transaction() as session:
        types = (await session.scalars(select(Event.type))).all()
    assert "winmail.unpacked" not in types


@pytest.mark.parametrize("kind", ["meeting-request", "damaged"])
async def test_a_winmail_dat_that_is_more_than_files_is_linked_whole(
    relay: Harness, kind: str
) -> None:
    """Nothing of it is lost: an invitation's meeting, or a stream we cannot read, goes to
    the prospect as the winmail.dat it was."""
    carried = [tnef_stream.Attachment(PDF, title="a.pdf")]
    if kind == "meeting-request":
        winmail = tnef_stream.stream(carried, message_class=tnef_stream.MEETING_REQUEST)
    else:
        winmail = tnef_stream.stream(carried)[:-5000]
    await relay.send(outlook_rich_text(winmail), recipients=[PROSPECT])
    [copy] = await relay.sink.expect(1)
    assert await linked_files(relay, copy.data) == {"winmail.dat": winmail}
