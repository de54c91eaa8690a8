"""A big copy sent from its stored blob in pieces is byte for byte the copy built whole.

The body hash over pieces against body_hash() (fuzzed, and at every cut of hand-made bodies
including a read of 1 byte), the copy read from a local and an S3 store against prepare(),
and what the SMTP writer puts on the wire against stuffed_pieces() of the whole copy, with
reads that split CRLFs and ".\\r\\n" lines. tracemalloc bounds the memory of a 10 MB copy.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail import lines
from gateway.mail.dkim import BodyHash, DkimKey, body_hash, generate_private_key
from gateway.mail.headers import split_offsets
from gateway.mail.loop_mark import LoopMarks
from gateway.mail.outgoing import Signer, prepare
from gateway.outbound.smtp_connection import (
    SourceFailed,
    bare_line_end_refusal,
    stuffed_pieces,
    stuffed_stream,
    utf8_header,
)
from gateway.outbound.stored_copy import (
    WHOLE,
    BlobChanged,
    DigestProof,
    StoredCopy,
    build,
    intake_body_hash,
    keep,
    window_sums,
)
from gateway.outbound.upstream import CaptureUpstream
from gateway.store.blobs import BlobReader, BlobStore
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.models import Message, MessageKind
from tests.conftest import dkim_dns
from tests.s3_server import S3Server

DOMAIN = "broker.example"
NOW = 1_796_000_000
HEADER = (
    b"From: Anna Agent <anna@broker.example>\r\n"
    b"To: paula@example.org\r\n"
    b"Subject: =?utf-8?q?Expos=C3=A9?=\r\n"
    b"Message-ID: <villa@broker.example>\r\n"
    b"\r\n"
)
PIECES = [b"a", b"Z9", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"."]


@pytest.fixture(scope="module")
def key() -> DkimKey:
    return DkimKey(DOMAIN, "s2026", generate_private_key())


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server
) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    s3 = s3_server.store(s3_server.new_bucket())
    yield s3
    await s3.close()


def row(raw: bytes) -> Message:
    return Message(
        id="0123456789abcdef0123",
        sender="anna@broker.example",
        blob="",
        size=len(raw),
        message_id_header="<villa@broker.example>",
        received_at=datetime(2026, 12, 3, 10, 0, tzinfo=UTC),
        helo="client.broker.example",
        peer="192.0.2.7",
        protocol="ESMTPSA",
        trusted_client=None,
    )


def streamed_hash(body: bytes, cuts: list[int], piece: int = 1024 * 1024) -> str:
    hasher = BodyHash(piece)
    start = 0
    for cut in [*sorted(cuts), len(body)]:
        hasher.update(body[start:cut])
        start = max(start, cut)
    return hasher.value()


# --- the body hash over pieces ----------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=40),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    piece=st.sampled_from([1, 3, 16, 1024 * 1024]),
)
def test_the_body_hash_over_pieces_is_body_hashs(
    pieces: list[bytes], cuts: list[int], piece: int
) -> None:
    """`piece` small: a line not ended yet is fed early, up to its last visible octet."""
    body = b"".join(pieces)
    assert streamed_hash(body, cuts, piece) == body_hash(body)


BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b" \t \r\n\r\n",
    b"Guten Tag,\r\n\r\nhier  ist\tdas Expos\xc3\xa9. \r\n",
    b"Zeile\r\n.\r\n..\r\n.Punkt\r\n\r\n\r\n",
    b"ohne Zeilenende am Schluss \t",
    b"Leerzeilen am Ende\r\n \r\n\t\r\n\r\n",
    b"Leerzeilen\r\n\r\n\r\nund wieder Text\r\n\r\n",
    b"nackte\nZeilen\renden\r\r\n\n",
    b"a" * 5000 + b"  \t  " + b"b" * 3000 + b" \r\n" + b"\r\n" * 2000,
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
@pytest.mark.parametrize("read", [1, 2, 3, 5, 64])
def test_the_body_hash_is_the_same_at_every_cut(body: bytes, read: int) -> None:
    """Reads of `read` octets, so cuts fall between CR and LF and around each "." line;
    a line longer than the piece (64) is fed before its end."""
    assert streamed_hash(body, list(range(0, len(body), read)), 64) == body_hash(body)
    for cut in range(min(len(body), 40)):
        assert streamed_hash(body, [cut]) == body_hash(body)


# --- the copy read from the store -------------------------------------------------------------


def big_message(pad: int = 0) -> bytes:
    """Over WHOLE, so it is streamed; lines of "." and CRLFs around every read boundary,
    text with white space to canonicalize, and empty lines at the end."""
    header = HEADER.replace(b"Subject:", b"Subject:" + b" " * pad)
    text = b"Zeile mit  doppelten Leerzeichen und\tTab am Ende \t\r\n"
    dots = b".\r\n..\r\n.x\r\n" * 100
    body = b""
    while len(header) + len(body) < WHOLE + 3000:
        body += text + dots
    return header + body + b"\r\n \r\n\r\n"


@asynccontextmanager
async def stored_copy(
    store: BlobStore, raw: bytes, signer: Signer, read: int | None, loop: LoopMarks | None = None
) -> AsyncIterator[tuple[StoredCopy, bytes]]:
    """The streamed copy, its blob open for the block, and the copy built whole."""
    digest = await store.put(raw)
    whole = prepare(raw, row(raw), "relay.broker.example", signer, loop, now=NOW)
    async with store.open(digest) as blob:
        copy = await build(
            blob, row(raw), "relay.broker.example", signer, loop, window=read, now=NOW
        )
        assert isinstance(copy, StoredCopy)
        yield copy, whole


async def joined(copy: StoredCopy) -> bytes:
    return b"".join([chunk async for chunk in copy.chunks()])


@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize(
    ("store", "read"),
    [("local", 7), ("local", 4093), ("local", 1024 * 1024), ("s3", 4093), ("s3", None)],
    indirect=["store"],
)
async def test_the_streamed_copy_is_the_copy_built_whole(
    store: BlobStore, key: DkimKey, pad: int, read: int
) -> None:
    """The same signature (body hash, header hash, b=) and the same bytes after it; the
    WHOLE boundary falls in each place of a ".\\r\\n" line as `pad` moves the body."""
    moment = datetime.fromtimestamp(NOW, UTC)
    loop = LoopMarks(b"k" * 32, "relay.broker.example", timedelta(days=3), lambda: moment)
    raw = big_message(pad)
    async with stored_copy(store, raw, Signer({DOMAIN: key}), read, loop) as (copy, whole):
        assert copy.head.startswith(b"DKIM-Signature:")
        assert copy.head + raw == whole
        assert await joined(copy) == whole
    assert dkimpy.verify(whole, dnsfunc=dkim_dns(key))


async def test_an_unsigned_copy_streams_the_same_bytes(store: BlobStore) -> None:
    raw = big_message()
    async with stored_copy(store, raw, Signer({}), 4096) as (copy, whole):
        assert not copy.head.startswith(b"DKIM-Signature:")
        assert await joined(copy) == whole


async def test_small_copies_and_header_blocks_past_the_first_read_are_built_whole(
    tmp_path: Path, key: DkimKey
) -> None:
    store = LocalBlobStore(tmp_path)
    signer = Signer({DOMAIN: key})
    small = HEADER + b"Guten Tag!\r\n"
    fillers = b"".join(b"X-Filler: " + b"y" * 990 + b"\r\n" for _ in range(WHOLE // 1000 + 5))
    for raw in (small, fillers + HEADER + b"Text\r\n" * 10):
        async with store.open(await store.put(raw)) as blob:
            built = await build(blob, row(raw), "relay.broker.example", signer, now=NOW)
        assert built == prepare(raw, row(raw), "relay.broker.example", signer, now=NOW)


class CountedReads(BlobReader):
    """A reader that notes the ranges read through it."""

    def __init__(self, blob: BlobReader) -> None:
        self.blob = blob
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.blob.size

    async def read(self, start: int, length: int) -> bytes:
        self.reads.append((start, length))
        return await self.blob.read(start, length)


def submitted(raw: bytes, digest: str, body_hash: str | None) -> Message:
    message = row(raw)
    message.blob, message.kind, message.body_hash = digest, MessageKind.SUBMITTED, body_hash
    return message


def body_hash_of(raw: bytes) -> str | None:
    return intake_body_hash(raw, {DOMAIN})


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
async def test_a_submitted_original_is_read_once(
    store: BlobStore, key: DkimKey, signed: bool
) -> None:
    """The intake checked a submitted original's line ends under its digest and kept its
    body hash: its copy is built before its body is read, then read once as it is sent.
    The same copy as built whole, signature included."""
    raw = big_message(1)
    digest = await store.put(raw)
    signer = Signer({DOMAIN: key} if signed else {})
    message = submitted(raw, digest, body_hash_of(raw) if signed else None)
    async with store.open(digest) as opened:
        blob = CountedReads(opened)
        copy = await build(
            blob, message, "relay.broker.example", signer, window=4093, now=NOW, digest=digest
        )
        assert isinstance(copy, StoredCopy) and copy.bare_line_end == -1
        assert blob.reads == [(0, WHOLE), (len(raw) - 2, 2)]
        sent = await joined(copy)
    whole = prepare(raw, message, "relay.broker.example", signer, now=NOW)
    assert sent == whole
    body = blob.reads[2:]
    assert body[0] == (WHOLE, 4093) and sum(length for _, length in body) == len(raw) - WHOLE
    assert not signed or dkimpy.verify(whole, dnsfunc=dkim_dns(key))


async def test_an_original_without_its_body_hash_is_read_twice(
    tmp_path: Path, key: DkimKey
) -> None:
    """Stored before body hashes were kept (or with a key added since): a first read
    hashes the body, then it is sent, proved by its digest; the copy is the same."""
    store = LocalBlobStore(tmp_path)
    raw = big_message()
    digest = await store.put(raw)
    message = submitted(raw, digest, None)
    signer = Signer({DOMAIN: key})
    async with store.open(digest) as opened:
        blob = CountedReads(opened)
        copy = await build(blob, message, "relay.broker.example", signer, now=NOW, digest=digest)
        assert isinstance(copy, StoredCopy) and isinstance(copy.reads, DigestProof)
        assert sum(length for _, length in blob.reads) == len(raw) + 2  # and the tail
        assert await joined(copy) == prepare(raw, message, "relay.broker.example", signer, now=NOW)


@pytest.mark.parametrize("last", [1, 2, 3])
async def test_an_original_whose_last_read_is_an_octet_or_two(
    tmp_path: Path, key: DkimKey, last: int
) -> None:
    """The copy's last two octets, which said its size on the wire, may span two reads."""
    store = LocalBlobStore(tmp_path)
    raw = big_message()
    raw = raw[:-2] + b"x" * ((last - len(raw) + WHOLE) % 1024) + b"\r\n"
    assert (len(raw) - WHOLE) % 1024 == last
    digest = await store.put(raw)
    signer = Signer({DOMAIN: key})
    message = submitted(raw, digest, body_hash_of(raw))
    async with store.open(digest) as blob:
        copy = await build(
            blob, message, "relay.broker.example", signer, window=1024, now=NOW, digest=digest
        )
        assert isinstance(copy, StoredCopy) and copy.ends_in_crlf
        assert await joined(copy) == prepare(raw, message, "relay.broker.example", signer, now=NOW)


def test_the_intake_keeps_the_body_hash_of_big_signed_originals_only() -> None:
    raw = big_message()
    _, body_start = split_offsets(raw)
    assert body_hash_of(raw) == body_hash(raw, body_start)
    assert body_hash_of(raw.replace(b"anna@broker.example", b"anna@other.example")) is None
    assert body_hash_of(HEADER + b"Guten Tag!\r\n") is None
    upper = raw.replace(b"anna@broker.example", b"anna@Broker.EXAMPLE")
    assert body_hash_of(upper) == body_hash(raw, body_start)


@pytest.mark.parametrize("damage", [b"\n", b"#"], ids=["a bare LF", "one octet"])
@pytest.mark.parametrize("where", ["last", "middle"], ids=["in the last read", "in a middle read"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed, no body hash kept"])
async def test_an_original_that_is_not_what_it_names_never_leaves_whole(
    tmp_path: Path, key: DkimKey, damage: bytes, where: str, signed: bool
) -> None:
    """Bytes changed on the disk since the intake checked them (a bare LF, or any other
    octet), wherever they are: the last read is held back until the sha256 proves the
    blob, so the data stops short of its end and the upstream never takes it."""
    store = LocalBlobStore(tmp_path)
    raw = big_message()
    digest = await store.put(raw)
    message = submitted(raw, digest, None)
    signer = Signer({DOMAIN: key} if signed else {})
    changed = bytearray(raw)
    at = raw.rindex(b".x") + 1 if where == "last" else raw.index(b"Zeile", WHOLE) + 2
    changed[at] = damage[0]
    Path(store.location(digest)).write_bytes(bytes(changed))
    whole = prepare(raw, message, "relay.broker.example", signer)
    async with store.open(digest) as blob:
        copy = await build(
            blob, message, "relay.broker.example", signer, window=1024, digest=digest
        )
        assert isinstance(copy, StoredCopy)
        sent = 0
        with pytest.raises(SourceFailed) as failed:
            async for piece in stuffed_stream(copy):
                sent += len(piece)
        assert isinstance(failed.value.__cause__, BlobChanged)
        assert "does not hold the bytes it names" in str(failed.value.__cause__)
        assert 0 < sent < sum(map(len, stuffed_pieces(whole)))
        message.kind = MessageKind.BOUNCE  # not checked at an intake: scanned, as before
        copy = await build(blob, message, "relay.broker.example", signer, digest=digest)
        assert isinstance(copy, StoredCopy)
        assert (copy.bare_line_end != -1) == (damage == b"\n")


# --- what the SMTP writer sends ---------------------------------------------------------------


@pytest.mark.parametrize("read", [1, 2, 3, 5, 4096])
async def test_dot_stuffing_across_reads_is_the_whole_copys(tmp_path: Path, read: int) -> None:
    """Reads cut before a dot, between CR and LF and after ".", so a line's leading dot
    is doubled where a read begins too."""
    store = LocalBlobStore(tmp_path)
    raw = b".\r\n" + HEADER + b".\r\n..\r\n.x\r\nText.\r\n\r\n.\r\n" * 50
    async with store.open(await store.put(raw)) as blob:
        for head in (b"", b"X-Head: 1\r\n"):
            copy = StoredCopy(head, blob, -1, raw.endswith(b"\r\n"), window_sums(raw, read, read))
            sent = b"".join([piece async for piece in stuffed_stream(copy)])
            assert sent == b"".join(stuffed_pieces(head + raw))
            assert b"\r\n.\r\n" not in sent and not sent.startswith(b".\r\n")


async def test_a_signed_copy_is_stuffed_as_the_whole_one(tmp_path: Path, key: DkimKey) -> None:
    raw = big_message()
    async with stored_copy(LocalBlobStore(tmp_path), raw, Signer({DOMAIN: key}), 4093) as (
        copy,
        whole,
    ):
        sent = b"".join([piece async for piece in stuffed_stream(copy)])
    assert sent == b"".join(stuffed_pieces(whole))


async def test_a_copy_without_a_final_crlf_gets_one_on_the_wire(tmp_path: Path) -> None:
    raw = big_message().rstrip(b"\r\n") + b"\r\n.letzte Zeile"
    async with stored_copy(LocalBlobStore(tmp_path), raw, Signer({}), 4093) as (copy, whole):
        sent = b"".join([piece async for piece in stuffed_stream(copy)])
    assert sent == b"".join(stuffed_pieces(whole))
    assert sent.endswith(b"\r\n..letzte Zeile\r\n")


@pytest.mark.parametrize("bad", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n.\n", b"end\r"])
async def test_a_bare_line_end_is_found_before_anything_is_sent(tmp_path: Path, bad: bytes) -> None:
    raw = big_message() + bad
    async with stored_copy(LocalBlobStore(tmp_path), raw, Signer({}), 4096) as (copy, whole):
        assert copy.bare_line_end == lines.bare_line_end(whole) != -1
        assert bare_line_end_refusal(copy) == bare_line_end_refusal(whole)


async def test_a_blob_changed_since_the_first_read_stops_the_data(tmp_path: Path) -> None:
    """Bytes changed behind the store's back (a disk, an operator) between the body hash
    and the send: the writer stops before the data's end, so nothing unsigned or unchecked
    leaves."""
    store = LocalBlobStore(tmp_path)
    raw = big_message()
    digest = await store.put(raw)
    async with store.open(digest) as blob:
        copy = await build(blob, row(raw), "relay.broker.example", Signer({}), window=4096)
        assert isinstance(copy, StoredCopy)
        with (tmp_path / digest[:2] / digest[2:4] / digest).open("r+b") as file:
            file.seek(len(raw) - 100)
            file.write(b"#" if raw[-100:-99] != b"#" else b"+")
        sent = 0
        with pytest.raises(SourceFailed) as failed:
            async for piece in stuffed_stream(copy):
                sent += len(piece)
    assert isinstance(failed.value.__cause__, BlobChanged)
    whole = prepare(raw, row(raw), "relay.broker.example", Signer({}))
    assert 0 < sent < sum(map(len, stuffed_pieces(whole)))


# --- memory -----------------------------------------------------------------------------------


async def test_a_10_mb_copy_is_hashed_and_sent_in_a_window(tmp_path: Path, key: DkimKey) -> None:
    """Memory held while a 10 MB copy is built and written is a few reads, not the copy."""
    store = LocalBlobStore(tmp_path)
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    raw = HEADER + line * (10_000_000 // len(line))
    digest = await store.put(raw)
    del raw
    tracemalloc.start()
    try:
        async with store.open(digest) as blob:
            message = row(b"")
            message.size = blob.size
            copy = await build(blob, message, "relay.broker.example", Signer({DOMAIN: key}))
            assert isinstance(copy, StoredCopy)
            sent = 0
            async for piece in stuffed_stream(copy):
                sent += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > 10_000_000
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held for a 10 MB copy"


async def test_a_kept_signed_copy_is_the_streamed_copy(store: BlobStore, key: DkimKey) -> None:
    """A released original's signed copy is stored from the pieces that leave."""
    raw = big_message()
    async with stored_copy(store, raw, Signer({DOMAIN: key}), 4093) as (copy, whole):
        digest = await keep(copy, store)
    assert await store.read(digest) == whole
    assert await keep(whole, store) == digest


async def test_a_capture_directory_gets_the_streamed_copy_whole(
    tmp_path: Path, key: DkimKey
) -> None:
    raw = big_message()
    capture = CaptureUpstream(tmp_path / "capture")
    async with stored_copy(
        LocalBlobStore(tmp_path / "blobs"), raw, Signer({DOMAIN: key}), 4093
    ) as (
        copy,
        whole,
    ):
        [outcome] = (await capture.send("anna@broker.example", ["p@example.org"], copy)).values()
    assert outcome.delivered
    [written] = (tmp_path / "capture").glob("*.eml")
    assert written.read_bytes() == whole
    assert written.name == f"{row(raw).id}.eml"


@pytest.mark.parametrize("subject", ["Exposé für Jörg", "Expose"])
async def test_a_stored_copy_says_whether_its_header_block_is_utf8(
    tmp_path: Path, subject: str
) -> None:
    """Read from the header block the copy is built from, on both ways a big copy is built
    (an original proved by its digest, another copy by a first pass), as a whole one says
    it from its bytes: SMTPUTF8 goes with it where the upstream offers it."""
    store = LocalBlobStore(tmp_path)
    raw = big_message().replace(b"Subject: ", f"Subject: {subject} ".encode(), 1)
    digest = await store.put(raw)
    utf8 = not subject.isascii()
    for message, named in ((submitted(raw, digest, None), digest), (row(raw), None)):
        async with store.open(digest) as blob:
            copy = await build(blob, message, "relay.broker.example", Signer({}), digest=named)
            assert isinstance(copy, StoredCopy) and copy.utf8_header is utf8
            assert utf8_header(copy) is utf8
    assert utf8_header(prepare(raw, row(raw), "relay.broker.example", Signer({}))) is utf8
