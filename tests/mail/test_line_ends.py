"""Every line the relay writes upstream ends in CRLF, whatever charset the agent's text is in.

A text part in a charset that does not keep ASCII bytes (UTF-7, UTF-16, EBCDIC) used to be
decoded and re-encoded when a link block was added: UTF-7 ``+AAoALgANAAo-`` became a bare
``\\n.\\r\\n`` on the wire, and a receiver that ends DATA at LF "." CRLF stored the rest as a
second, forged message. The surgery is fuzzed over charsets and transfer encodings here, and
one copy goes end to end through a real relay into such a lax receiver.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message

import aiosmtplib
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.mail import headers, mime
from gateway.outbound import queue
from gateway.outbound.smtp_connection import SmtpConnection
from gateway.store import models
from gateway.store.models import Event
from sealrelay.serve import Relay
from tests.conftest import AGENT, StartRelay
from tests.support import free_port

URL = "https://dl.example/t/AbC123"
BLOCKS = [
    f"Ihre Unterlagen:\nGrundriss – Exposé für Käufer (2 MB, 1,50 €): {URL}\n",
    f"Your files: {URL}\n",
]
HTML_BLOCK = f'<p>Ihre Unterlagen: <a href="{URL}">Exposé für Käufer</a> – 1,50 €</p>'
CHARSETS = [
    "utf-7",
    "utf-16",
    "utf-16-be",
    "utf-32",
    "cp037",
    "cp500",
    "latin-1",
    "utf-8",
    "us-ascii",
    "iso-2022-jp",
    "shift_jis",
    "koi8-r",
    "gb18030",
    "raw-unicode-escape",
]
ENCODINGS = ["7bit", "8bit", "quoted-printable", "base64"]
SMUGGLING_TEXT = st.text(st.sampled_from(list("ab .\r\n")), max_size=40)
ANY_TEXT = st.text(
    st.sampled_from(list("ab Z09.\r\n\t=+-~\\<>&;äöü€日本Жé\x00"))
    | st.characters(codec="utf-8", exclude_categories=("Cs",)),
    max_size=120,
)
LONG_LINE = st.text(st.sampled_from(list("äa €")), min_size=500, max_size=990)
MAX_LINE = 998


# --- building the agent's message ----------------------------------------------------------


def utf7(text: str) -> bytes:
    """UTF-7 that shifts every character outside a small direct set, CR and LF included,
    as an attacker's client may (Python's own encoder writes CR and LF directly)."""
    out = []
    for char in text:
        if char.isascii() and (char.isalnum() or char in " .,:?'()"):
            out.append(char.encode("ascii"))
        elif char == "+":
            out.append(b"+-")
        else:
            shifted = base64.b64encode(char.encode("utf-16-be")).rstrip(b"=")
            out.append(b"+" + shifted + b"-")
    return b"".join(out)


def encode_text(text: str, charset: str) -> bytes:
    """The text's lines in `charset`, joined by CRLF line breaks on the wire."""
    lines = text.split("\r\n")
    if charset == "utf-7":
        return b"\r\n".join(utf7(line) for line in lines)
    if charset.startswith(("utf-16", "utf-32")):
        return text.encode(charset)
    return b"\r\n".join(line.encode(charset) for line in lines)


def transfer_encoded(data: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if encoding == "quoted-printable":
        # CR and LF in the data become =0D/=0A; the only raw line breaks are soft ones.
        return binascii.b2a_qp(data, istext=False).replace(b"\n", b"\r\n")
    return data


def encodable(text: str, charset: str) -> str:
    return "".join(c for c in text if c.encode(charset, "ignore"))


def text_part(kind: str, body: bytes, charset: str, encoding: str) -> bytes:
    return (
        f"Content-Type: text/{kind}; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode() + body


def agent_message(shape: str, text_body: bytes, html_body: bytes, charset: str, cte: str) -> bytes:
    top = f"From: Anna <{AGENT}>\r\nTo: p@example.com\r\nSubject: Angebot\r\nMIME-Version: 1.0\r\n"
    plain = text_part("plain", text_body, charset, cte)
    if shape == "single":
        return top.encode() + plain
    page = text_part("html", html_body, charset, cte)
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\n" + plain + b"\r\n--alt\r\n" + page + b"\r\n--alt--\r\n"
    )
    if shape == "alternative":
        return top.encode() + alternative
    attachment = (
        b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
    )
    return (
        top.encode() + b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        b"--mix\r\n" + alternative + b"\r\n--mix\r\n" + attachment + b"--mix--\r\n"
    )


# --- what must hold of the result ----------------------------------------------------------


def lines_of(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def leaf_texts(raw: bytes) -> list[tuple[str, str]]:
    """(content type, text) of every text leaf, decoded by its charset as a reader would."""
    root = mime.parse(raw)
    texts = []
    for part in root.walk():
        if part.children or not part.content_type.startswith("text/"):
            continue
        charset = part.params.get("charset", "us-ascii")
        texts.append((part.content_type, mime.decoded_body(raw, part).decode(charset, "replace")))
    return texts


def defects(raw: bytes) -> set[str]:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return {type(d).__name__ for part in message.walk() for d in part.defects}


def longest_line(raw: bytes) -> int:
    return max(len(line) for line in raw.split(b"\r\n"))


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    charset=st.sampled_from(CHARSETS),
    encoding=st.sampled_from(ENCODINGS),
    shape=st.sampled_from(["single", "alternative", "mixed"]),
    text=SMUGGLING_TEXT | ANY_TEXT | LONG_LINE,
    block=st.sampled_from(BLOCKS),
)
def test_link_block_surgery_writes_only_crlf_lines(
    charset: str, encoding: str, shape: str, text: str, block: str
) -> None:
    encoded = encode_text(encodable(text, charset), charset)
    text = encoded.decode(charset, "replace")  # as a reader of the agent's part sees it
    text_body = transfer_encoded(encoded, encoding)
    html_body = transfer_encoded(
        encode_text(f"<html><body><p>{text}</p></body></html>", charset), encoding
    )
    raw = agent_message(shape, text_body, html_body, charset, encoding)
    accepted = not headers.has_bare_line_end(raw)  # the relay refuses the others at intake
    note(f"accepted={accepted} raw={raw!r}")

    root = mime.parse(raw)
    linked = [p.id for p in mime.part_facts(raw, root) if p.is_attachment and p.id]
    without = mime.remove_parts(raw, root, linked)
    out = mime.add_link_block(without, mime.parse(without), block, HTML_BLOCK)
    note(f"out={out!r}")

    texts = leaf_texts(out)  # parses, and every text leaf decodes
    assert any(URL in body for kind, body in texts if kind == "text/plain")
    assert any(lines_of(body).startswith(lines_of(text)) for _, body in texts)
    if accepted:
        assert not headers.has_bare_line_end(out)
        assert defects(out) <= defects(raw)
        if longest_line(raw) <= MAX_LINE:
            assert longest_line(out) <= MAX_LINE


def test_utf7_line_breaks_stay_inside_the_untouched_part() -> None:
    """The reported case: the agent's UTF-7 bytes leave as written, the block beside them."""
    body = b"Hallo+AAoALgANAAo-MAIL FROM:+ADw-ceo+AEA-bank.example+AD4-\r\n"
    raw = agent_message("mixed", body, body, "utf-7", "7bit")
    root = mime.parse(raw)
    without = mime.remove_parts(raw, root, ["2"])
    out = mime.add_link_block(without, mime.parse(without), BLOCKS[0], HTML_BLOCK)
    assert not headers.has_bare_line_end(out)
    assert out.count(body) == 2  # text and HTML part, byte for byte
    message = email.message_from_bytes(out, policy=email.policy.default)
    plain = [p for p in message.walk() if p.get_content_type() == "text/plain"]
    assert [p.get_content_charset() for p in plain] == ["utf-8", "utf-7"]
    assert plain[0].get_content() == BLOCKS[0].replace("\n", "\r\n")
    assert plain[1].get_content().startswith("Hallo\n.\r\nMAIL FROM:<ceo@bank.example>")


# --- the upstream writer refuses what it must never send ------------------------------------


@pytest.mark.parametrize("bad", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n.\n", b"end\r"])
async def test_the_upstream_writer_refuses_a_bare_cr_or_lf_before_writing_anything(
    bad: bytes,
) -> None:
    sink = await LaxSink().start()
    try:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sink.port, timeout=5, local_hostname="relay.test"
        )
        await client.connect()
        connection = await SmtpConnection.adopt(
            client, remote="lax", where="lax", pipelining=True, chunking=True
        )
        with pytest.raises(aiosmtplib.SMTPException, match="bare CR or LF"):
            await connection.send("a@broker.example", ["p@example.com"], b"x\r\n\r\n" + bad, 5)
        await connection.quit()
    finally:
        await sink.stop()
    assert sink.messages == []
    assert b"MAIL" not in sink.wire and b"DATA" not in sink.wire


async def test_a_queued_copy_with_a_bare_lf_is_deferred_never_sent(
    relay_factory: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever made it (a future bug, a copy stored by an older version): it stays queued."""
    relay = await relay_factory()
    core = relay.relay
    raw = f"From: {AGENT}\r\nTo: p@example.com\r\nSubject: x\r\n\r\nHi\n.\r\nMAIL FROM:<x>\r\n"
    now = core.clock()
    async with core.db.transaction() as session:
        message = models.Message(
            sender=AGENT,
            blob=await core.blobs.put(raw.encode()),
            size=len(raw),
            message_id_header="<bare@broker.example>",
            subject="x",
            received_at=now,
        )
        session.add(message)
        await session.flush()
        session.add(queue.new_delivery(message.id, "p@example.com", message.blob, now, 3600))
    core.signal.notify()
    deferred = await journal_event(core, "delivery.deferred")
    assert "copy not sent: it holds a bare CR or LF at byte" in deferred.data["error"]
    assert "refusing to send a copy" in caplog.text
    assert relay.sink.messages == []


async def journal_event(core: Relay, kind: str, timeout: float = 30) -> Event:
    """The first journal event of `kind`, polled within a bounded time."""
    async with asyncio.timeout(timeout):
        while True:
            async with core.db.transaction() as session:
                found = await session.scalar(select(Event).where(Event.type == kind))
            if found is not None:
                return found
            await asyncio.sleep(0.05)


# --- end to end, into a receiver that ends DATA at LF "." CRLF ------------------------------


@dataclass
class Stored:
    mail_from: bytes
    rcpt_tos: list[bytes]
    data: bytes


@dataclass
class LaxSink:
    """An SMTP receiver of the kind smuggling exploits: it splits lines at LF alone, so a
    line "." ends DATA even when the line before ended in a bare LF, and whatever follows is
    read as the next commands. It keeps every byte it was sent in `wire`."""

    port: int = 0
    wire: bytes = b""
    messages: list[Stored] = field(default_factory=list)
    sessions_ended: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> LaxSink:
        self.port = free_port()
        self._server = await asyncio.start_server(self._session, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def expect(self, count: int, timeout: float = 30) -> list[Stored]:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)

    async def ended(self, sessions: int, timeout: float = 30) -> None:
        """Wait until `sessions` connections closed: all they carried has been read."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: self.sessions_ended >= sessions)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lax.test ESMTP\r\n")
        mail_from, rcpt_tos = b"", []
        try:
            while line := await reader.readline():
                self.wire += line
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 lax.test\r\n")
                elif verb == b"MAIL":
                    mail_from, rcpt_tos = line[10:].strip(), []
                    writer.write(b"250 OK\r\n")
                elif verb == b"RCPT":
                    rcpt_tos.append(line[8:].strip())
                    writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await self._data(reader)
                    async with self._changed:
                        self.messages.append(Stored(mail_from, rcpt_tos, data))
                        self._changed.notify_all()
                    writer.write(b"250 OK stored\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        finally:
            writer.close()
            async with self._changed:
                self.sessions_ended += 1
                self._changed.notify_all()

    async def _data(self, reader: asyncio.StreamReader) -> bytes:
        lines = []
        while True:
            line = await reader.readline()
            self.wire += line
            if line in (b".\r\n", b".\n", b""):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


@pytest.fixture
async def lax_sink() -> AsyncIterator[LaxSink]:
    sink = await LaxSink().start()
    yield sink
    await sink.stop()


SMUGGLED = (
    b"Guten Tag,+AAoALgANAAo-MAIL FROM:+ADw-ceo+AEA-bank.example+AD4-\r\n"
    b"RCPT TO:+ADw-victim+AEA-example.com+AD4-\r\n"
    b"DATA\r\n"
    b"From: ceo+AEA-bank.example\r\n"
    b"Subject: Forged\r\n"
    b"\r\n"
    b"Please pay.\r\n"
)


def smuggling_offer() -> bytes:
    return (
        (
            f"From: Anna Agent <{AGENT}>\r\nTo: p@example.com\r\nSubject: Exposé\r\n"
            "X-Sealrelay-Language: en\r\n"  # an all-ASCII block: the part stayed 7bit
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
            "--mix\r\n"
            "Content-Type: text/plain; charset=utf-7\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n"
        ).encode()
        + SMUGGLED
        + (
            b"\r\n--mix\r\n"
            b"Content-Type: application/pdf\r\n"
            b"Content-Disposition: attachment; filename=plan.pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(bytes(range(256)) * 20).replace(b"\n", b"\r\n")
            + b"--mix--\r\n"
        )
    )


async def test_utf7_smuggling_through_the_relay_stores_one_message(
    relay_factory: StartRelay, lax_sink: LaxSink
) -> None:
    relay = await relay_factory(
        upstream={"url": f"smtp://127.0.0.1:{lax_sink.port}"},
        policy={"link_attachments_over": 1000},
    )
    await relay.send(smuggling_offer(), recipients=["p@example.com"])
    await lax_sink.expect(1)
    await relay.relay.worker.close()  # QUIT on the kept connection
    await lax_sink.ended(1)  # the relay quit: the receiver has read every byte we sent
    [copy] = lax_sink.messages  # no second, forged message
    assert not headers.has_bare_line_end(lax_sink.wire)
    assert copy.rcpt_tos == [b"<p@example.com>"]
    assert SMUGGLED in copy.data  # the agent's UTF-7 bytes, untouched
    message: Message = email.message_from_bytes(copy.data, policy=email.policy.default)
    texts = [p.get_content() for p in message.walk() if p.get_content_type() == "text/plain"]
    assert any("/d/" in text for text in texts)
    assert not any(p.get_filename() == "plan.pdf" for p in message.walk())
