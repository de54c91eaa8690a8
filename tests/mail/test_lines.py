"""The windowed scans against plain per-line references, with windows small enough that
every CRLF, dot line and long line falls across a window border somewhere."""

from __future__ import annotations

import binascii
import re
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail import dkim, lines, mime
from gateway.memory import return_big_buffers
from tests.mail.test_dkim import as_delivered, dkimpy_body_hash

PIECES = st.sampled_from([b"a", b"Z9", b".", b"..", b" ", b"\t", b"\r\n", b"\r", b"\n", b"="])
DATA = st.lists(PIECES, max_size=60).map(b"".join)
WINDOWS = st.integers(min_value=1, max_value=9)


def reference_bare(data: bytes) -> int:
    found = re.search(rb"\r(?!\n)|(?<!\r)\n", data)
    return -1 if found is None else found.start()


def reference_longest(data: bytes) -> int:
    """The longest line, LF included, as aiosmtpd counts (the last needs no line end)."""
    return max((len(line) for line in data.splitlines(keepends=True) if line), default=0)


def reference_line_lengths(data: bytes) -> list[int]:
    lengths, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end + 1
        lengths.append(end - start)
        start = end
    return lengths


@settings(max_examples=500, deadline=None)
@given(data=DATA, window=WINDOWS)
def test_bare_line_end_finds_the_first(data: bytes, window: int) -> None:
    assert lines.bare_line_end(data, window) == reference_bare(data)
    assert lines.bare_line_end(bytearray(data), window) == reference_bare(data)


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"", -1),
        (b"\r\n", -1),
        (b"\n", 0),  # a lone LF at the start
        (b"a\r\nb\n", 4),  # ... and at the end
        (b"a\r", 1),  # a CR at the very end has no LF after it
        (b"\r\r\n", 0),
        (b"a\r\nb\rc\r\n", 4),
        (b"abc\r\n\n", 5),
    ],
)
@pytest.mark.parametrize("window", [1, 2, 3, 1024])
def test_bare_line_end_edges(data: bytes, offset: int, window: int) -> None:
    assert lines.bare_line_end(data, window) == offset


def test_crlf_split_across_every_window_border() -> None:
    data = b"x\r\n" * 5000
    for window in (2, 3, 4096, 4097):
        assert lines.bare_line_end(data, window) == -1
    assert lines.bare_line_end(data + b"\n", 4096) == len(data)
    broken = data[:9000] + b"\r" + data[9000:]
    assert lines.bare_line_end(broken, 4096) == reference_bare(broken)


CHANGES = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=300),
        st.sampled_from([b"\r", b"\n", b"a", b"\r\n", b""]),
        st.integers(min_value=0, max_value=1),
    ),
    max_size=2,
)


@settings(max_examples=1000, deadline=None)
@given(
    head=DATA,
    width=st.integers(min_value=1, max_value=6),
    count=st.integers(min_value=0, max_value=30),
    tail=DATA,
    changes=CHANGES,
    window=st.integers(min_value=1, max_value=80),
)
def test_bare_line_end_in_lines_of_one_width(
    head: bytes,
    width: int,
    count: int,
    tail: bytes,
    changes: list[tuple[int, bytes, int]],
    window: int,
) -> None:
    """Base64-like lines take the strided path: octets put in, taken out or changed
    anywhere (a bare CR in one line and a bare LF in another included) are found as the
    plain search finds them, whatever the windows and however the data comes in pieces."""
    data = head + (b"x" * (width - 1) + b"\r\n") * count + tail
    for at, octet, replaced in changes:
        at = min(at, len(data))
        data = data[:at] + octet + data[at + replaced :]
    assert lines.bare_line_end(data, window) == reference_bare(data)
    scan = lines.LineEndScan()
    for piece in range(0, len(data), window):
        scan.update(data[piece : piece + window])
    assert scan.end() == reference_bare(data)


@pytest.mark.parametrize(
    "lines_of_one_width",
    [
        b"ab\r\nab\r\n\rb\r\nab\r\na\n\r\nab\r\n",  # a bare CR and a bare LF, paired in count
        b"ab\r\nab\r\nab\ra\nab\r\n\rb\r\nab\r\n",  # a line's CR moved into another line
        b"ab\r\nab\r\nab\r\nab\r\nab\r\nab\n\r",  # the last line's CRLF the wrong way round
        b"ab\r\nab\r\nab\rza\n\r\nab\r\n",  # a line's LF moved into the next line
    ],
)
def test_strided_line_ends_that_only_pair_up_in_count_are_found(
    lines_of_one_width: bytes,
) -> None:
    expected = reference_bare(lines_of_one_width)
    assert expected != -1
    for window in (1, 7, 1024):
        assert lines.bare_line_end(lines_of_one_width, window) == expected


@settings(max_examples=500, deadline=None)
@given(data=DATA, limit=st.integers(min_value=1, max_value=8))
def test_line_limit_matches_the_per_line_count(data: bytes, limit: int) -> None:
    expected = any(length > limit for length in reference_line_lengths(data))
    assert lines.has_line_longer_than(data, limit) is expected
    assert lines.has_line_longer_than(bytearray(data), limit) is expected


@pytest.mark.parametrize("limit", [5, 1001])
def test_a_line_of_exactly_the_limit_passes_one_more_fails(limit: int) -> None:
    exact = b"x" * (limit - 2) + b"\r\n"
    assert reference_longest(exact) == limit
    for data in (exact, exact * 3, b"a\r\n" + exact, exact + b"x" * limit):
        assert not lines.has_line_longer_than(data, limit)
    longer = b"x" * (limit - 1) + b"\r\n"
    for data in (longer, exact + longer, longer + exact, exact + b"x" * (limit + 1)):
        assert lines.has_line_longer_than(data, limit)


@settings(max_examples=500, deadline=None)
@given(data=DATA)
def test_unstuffing_and_dot_lines(data: bytes) -> None:
    expected = data[1:] if data.startswith(b".") else data
    assert lines.unstuffed(bytearray(data)) == expected.replace(b"\r\n.", b"\r\n")
    assert lines.has_dot_line(data) is (data.startswith(b".") or b"\r\n." in data)


@settings(max_examples=1000, deadline=None)
@given(data=DATA, start=st.integers(0, 70), cut=st.integers(0, 70))
def test_dot_line_is_find(data: bytes, start: int, cut: int) -> None:
    end = max(len(data) - cut, 0)
    assert lines.dot_line(data, start, end) == data.find(b"\r\n.", start, end)
    assert lines.dot_line(bytearray(data), start) == data.find(b"\r\n.", start)
    assert lines.stuffed(data) == data.replace(b"\r\n.", b"\r\n..")


NEEDLES = st.sampled_from([b"\r\n.", b"--=_b1", b"--x", b"-", b"ab-ab-"])


@settings(max_examples=3000, deadline=None)
@given(
    needle=NEEDLES,
    rare=st.integers(0, 5),
    pieces=st.lists(st.sampled_from([b"-", b"--", b"=_b1", b"x", b"\r\n", b".", b"ab", b"ab-"])),
    start=st.integers(0, 40),
    cut=st.integers(0, 40),
    window=st.sampled_from([7, 11, 64 * 1024]),
    misses=st.sampled_from([0, 1, 8]),
)
def test_find_by_is_find(
    needle: bytes, rare: int, pieces: list[bytes], start: int, cut: int, window: int, misses: int
) -> None:
    """Also with windows of a few octets, and text assumed after `misses` misses, so that
    needles across every window border are looked for."""
    data = b"".join(pieces)
    rare = min(rare, len(needle) - 1)
    end = max(len(data) - cut, 0)
    with (
        mock.patch.object(lines, "_TEXT_WINDOW", window),
        mock.patch.object(lines, "_MISSES_IN_TEXT", misses),
    ):
        assert lines.find_by(data, needle, rare, start, end) == data.find(needle, start, end)
        assert lines.find_by(bytearray(data), needle, rare, start) == data.find(needle, start)


@pytest.mark.parametrize("before", [0, 1, 5, 65_530, 65_536, 200_000])
@pytest.mark.parametrize("rare", [0, 2, 5])
def test_find_by_in_text_windows_and_at_their_borders(before: int, rare: int) -> None:
    """A hyphen every few octets with no boundary after it (text) makes the search go a
    window at a time; the boundary is found wherever it falls, a window's border too."""
    text = (b"well-kept, up-to-date - e-mail " * 10_000)[:before]
    needle = b"--=_b1"
    data = text + b"\r\n" + needle + b"--\r\n" + b"after - text" * 50
    at = before + 2
    assert lines.find_by(data, needle, rare) == data.find(needle) == at
    for start in range(max(at - 7, 0), at + 2):
        assert lines.find_by(data, needle, rare, start) == data.find(needle, start)
        assert lines.find_by(data, needle, rare, 0, at + len(needle) - 1) == -1
    assert lines.find_by((b"QUJD" * 19 + b"\r\n") * 1000, needle, 0) == -1


@pytest.mark.parametrize("before", [0, 1, 2, 3, 65_530, 65_536, 200_000])
def test_dot_line_in_prose_windows_and_at_their_borders(before: int) -> None:
    """Text with a dot every few octets and no line start before them makes the search go
    a window at a time; the dot line is found wherever it falls, a window's border too."""
    prose = (b"Mr. Smith wrote: 3.5 rooms... e.g. a.b.c " * 5000)[:before]
    for line_start in (b"\r\n.", b"\r\n\r\n.end"):
        data = prose + line_start + b" more. text." * 100
        at = before + line_start.find(b"\r\n.")
        assert lines.dot_line(data) == data.find(b"\r\n.") == at
        for start in range(max(at - 3, 0), at + 2):
            assert lines.dot_line(data, start) == data.find(b"\r\n.", start)
    assert lines.dot_line(prose + b"\r\n", 0) == -1
    base64 = (b"QUJD" * 19 + b"\r\n") * 1000
    assert lines.dot_line(base64) == -1 and lines.stuffed(base64) is base64  # not copied


def test_many_dot_lines_are_unstuffed_alike() -> None:
    data = b"..a\r\n" + b"..b\r\n" * 300 + b"c\r\n..\r\n"
    assert lines.unstuffed(bytearray(data)) == b".a\r\n" + b".b\r\n" * 300 + b"c\r\n.\r\n"
    assert type(lines.unstuffed(bytearray(b"plain"))) is bytes


BODY_PIECES = st.sampled_from(
    [b"a", b"Z9", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\xc3\xa4"]
)


@settings(max_examples=500, deadline=None)
@given(
    prefix=st.binary(max_size=8),
    pieces=st.lists(BODY_PIECES, max_size=60),
    piece=st.integers(min_value=1, max_value=12),
)
def test_body_hash_in_pieces_matches_dkimpy(prefix: bytes, pieces: list[bytes], piece: int) -> None:
    body = b"".join(pieces)
    expected = dkimpy_body_hash(as_delivered(body) if body else body)
    assert dkim.body_hash(prefix + body, len(prefix), piece) == expected
    assert dkim.body_hash(body) == expected


def test_body_hash_of_a_big_base64_body_is_hashed_in_place() -> None:
    body = binascii.b2a_base64(bytes(range(256)) * 4000, newline=False)
    lines76 = b"\r\n".join(body[i : i + 76] for i in range(0, len(body), 76)) + b"\r\n\r\n \r\n"
    head = b"Subject: x\r\n\r\n"
    assert dkim.body_hash(head + lines76, len(head), 4096) == dkimpy_body_hash(lines76)


QP_PIECES = st.sampled_from(
    [b"a", b"=", b"=3D", b"=C3=A4", b"=\r\n", b"=\n", b"=\r", b"\r\n", b"\n", b"=4", b"==", b" "]
)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(QP_PIECES, max_size=40), window=WINDOWS)
def test_quoted_printable_size_without_decoding_whole(pieces: list[bytes], window: int) -> None:
    body = b"".join(pieces)
    raw = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body
    part = mime.parse(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "_SIZE_WINDOW", window)
        assert mime.decoded_size(raw, part) == len(binascii.a2b_qp(body))


@pytest.mark.parametrize("window", [3, 77, 1024 * 1024])
def test_base64_size_counted_a_window_at_a_time(window: int) -> None:
    data = bytes(range(256)) * 40
    encoded = binascii.b2a_base64(data).replace(b"\n", b"\r\n")
    wrapped = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    raw = b"Content-Transfer-Encoding: base64\r\n\r\n" + wrapped
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "_SIZE_WINDOW", window)
        assert mime.decoded_size(raw, mime.parse(raw)) == len(data)


_RSS_AFTER_FREE = textwrap.dedent(
    """
    import sys
    from gateway.memory import return_big_buffers

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    if sys.argv[1] == "fixed":
        assert return_big_buffers()
    first = bytearray(20 * 2**20)  # freeing a big block raises glibc's dynamic threshold
    del first
    base = rss_mib()
    kept, buffers = [], []
    for _ in range(30):  # message buffers, each with a smaller long-lived one after it
        buffer = bytearray(3 * 2**20)
        buffer[::4096] = b"x" * len(range(0, len(buffer), 4096))  # touch every page
        buffers.append(buffer)
        kept.append(bytearray(200_000))
    del buffers, buffer
    print(round(rss_mib() - base))
    """
)


def test_freed_message_buffers_go_back_to_the_system() -> None:
    """In a fresh interpreter: glibc keeps 90 MiB of freed buffers without the fixed
    threshold, and gives them back with it."""
    if not return_big_buffers():
        pytest.skip("not glibc on Linux")

    def kept_mib(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _RSS_AFTER_FREE, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return int(done.stdout)

    assert kept_mib("fixed") < 10
    assert kept_mib("default") > 60
