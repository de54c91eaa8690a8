"""Header fields read and added on raw bytes, never re-serialized."""

from __future__ import annotations

import email.policy
import random
import re
import string
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.mail import headers
from gateway.mail.outgoing import received_field
from gateway.store.bulk import new_row
from gateway.store.models import Message

RAW = (
    b"From: Anna <anna@broker.example>\r\n"
    b"Subject: =?utf-8?q?Expos=C3=A9?=\r\n  Musterstra\xc3\x9fe\r\n"
    b'To: a@example.com,\r\n\t"B, C" <B@Example.org>\r\n'
    b"\r\n"
    b"Body\r\n\r\nmore\r\n"
)


def test_split_and_parse_keep_bytes() -> None:
    block, body = headers.split_message(RAW)
    assert block + b"\r\n" + body == RAW
    fields = headers.parse_fields(block)
    assert [f.name for f in fields] == ["from", "subject", "to"]
    assert b"".join(f.raw for f in fields) == block
    assert headers.addresses(fields, "to") == ["a@example.com", "b@example.org"]
    assert headers.decoded(headers.first_value(fields, "subject") or "") == "Exposé  Musterstraße"


def test_message_without_body_or_headers() -> None:
    assert headers.split_message(b"Subject: x\r\n") == (b"Subject: x\r\n", b"")
    assert headers.split_message(b"\r\nbody") == (b"", b"body")


def test_format_field_folds_at_spaces_and_refuses_line_breaks() -> None:
    value = " ".join(["word"] * 40)
    field = headers.format_field("X-Long", value)
    lines = field.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert field.endswith(b"\r\n")
    unfolded = headers.parse_fields(field)[0].value
    assert unfolded == value
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            headers.format_field("X-Test", bad)
    with pytest.raises(ValueError):
        headers.format_field("X:Bad", "v")


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"a\r\nb\r\n", False),
        (b"a\nb", True),
        (b"a\rb\r\n", True),
        (b"a\r\n.\n", True),
        (b"\r\r\n", True),
        (b"", False),
    ],
)
def test_bare_line_ends(data: bytes, bare: bool) -> None:
    assert headers.has_bare_line_end(data) is bare


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
            st.from_regex(r"[ -~]{0,60}", fullmatch=True),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_prepended_fields_leave_the_rest_untouched(pairs: list[tuple[str, str]]) -> None:
    added = [headers.format_field(name, value.strip() or "x") for name, value in pairs]
    result = headers.prepend(RAW, added)
    assert result.endswith(RAW)
    fields = headers.fields_of(result)
    assert [f.name for f in fields[: len(pairs)]] == [n.lower() for n, _ in pairs]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("=?utf-8?q?Expos=C3=A9?=", "Exposé"),
        ("=?utf-8?q?a=0D=0AX-Injected:_1?=", "a  X-Injected: 1"),
        ("=?unknown-charset?q?x?=", "x"),
        ("plain\ttext", "plain text"),
    ],
)
def test_decoded_is_one_line_of_text(value: str, text: str) -> None:
    assert headers.decoded(value) == text


@given(st.text())
def test_controls_blanked_leaves_no_control_character_and_keeps_the_rest(text: str) -> None:
    line = headers.controls_blanked(text)
    assert len(line) == len(text)
    assert not headers.has_control(line)
    assert not any(c in line for c in "\r\n\x00\x7f")
    assert headers.has_control(text) == (line != text)
    assert all(
        b == a or (b == " " and (a < " " or a == "\x7f")) for a, b in zip(text, line, strict=True)
    )


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("Subject: Grüße\r\n".encode(), "Grüße"),
        ("Subject: Grüße – 3 Zimmer\r\n".encode("cp1252"), "Grüße – 3 Zimmer"),
        ("Subject: Gr\xfc\xdfe\r\n \xe0 bient\xf4t\r\n".encode("latin-1"), "Grüße à bientôt"),
        (b"Subject: a\x81b\r\n", "a\ufffdb"),  # a byte Windows-1252 leaves undefined
    ],
)
def test_raw_8bit_that_is_not_utf8_reads_as_windows_1252(raw: bytes, value: str) -> None:
    [field] = headers.parse_fields(raw)
    assert field.value == value


def test_values_without_encoded_words_read_as_the_parser_reads_them() -> None:
    """decoded() skips the header parser for ASCII without `=?`: the parser gives those back
    unchanged, which this checks on random values (control characters, quotes, comments)."""
    parser = email.policy.default.header_factory["x"]
    rng = random.Random(18)
    chars = string.printable + "\x00\x01\x7f"
    for _ in range(5_000):
        value = "".join(rng.choice(chars) for _ in range(rng.randint(0, 16)))
        if "=?" in value:
            continue
        assert headers.decoded(value) == re.sub(r"[\x00-\x1f\x7f]", " ", str(parser("x", value)))


PIECES = [b"From: a\r\n", b" folded\r\n", b"\tx\n", b"Subject:  two  spaces \r\n", b"bad\r\n"]
BLOCKS = st.lists(st.sampled_from([*PIECES, b"X:\r\n \r\n", b"\r", b"\n", b"a", b" "])).map(
    b"".join
) | st.binary(max_size=300)


@given(BLOCKS, st.booleans())
@example(b"Subject: \x91quoted\x92\r\n", False)
def test_a_block_parsed_again_gives_the_same_fields_as_one_too_big_to_keep(
    block: bytes, pad: bool
) -> None:
    if pad:  # over the size of blocks kept for parsing again: the uncached path
        block += b"X-Pad: " + b"a" * headers.CACHED_BLOCK_BYTES + b"\r\n"
    first = headers.parse_fields(block)
    first.append(headers.HeaderField("mine", b"Mine: 1\r\n"))  # the caller's own list
    again = headers.parse_fields(block)
    assert again == headers._parse_fields(block)
    assert b"".join(field.raw for field in again) == block
    assert [field.value for field in again] == [
        headers.utf8_or_windows_1252(
            re.sub(rb"\r?\n(?=[ \t])", b"", field.raw.partition(b":")[2]).rstrip(b"\r\n")
        ).strip()
        for field in again
    ]


@pytest.mark.parametrize(
    ("from_field", "sender", "name"),
    [
        ("Anna Agent <anna@broker.example>", "anna@broker.example", "Anna Agent"),
        (
            "=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@broker.example>",
            "J@Broker.example",
            "Jürgen Müller",
        ),
        ("anna@broker.example", "anna@broker.example", ""),
        # a team address in From, the agent's own in the envelope: the only name there is
        ("Team Nord <nord@broker.example>", "anna@broker.example", "Team Nord"),
        # several authors: the one who sent it
        ("Bert <b@broker.example>, Anna <anna@broker.example>", "anna@broker.example", "Anna"),
        ("Bert <b@broker.example>, Cleo <c@broker.example>", "anna@broker.example", ""),
        # the null sender (a read receipt): the author's name, else the author's address
        ("Anna Agent <anna@broker.example>", "", "Anna Agent"),
        ("anna@broker.example", "", "anna@broker.example"),
        (
            "=?utf-8?q?Evil=0D=0AX-Injected=3A_1?= <anna@broker.example>",
            "anna@broker.example",
            "Evil  X-Injected: 1",
        ),
    ],
)
def test_sender_name(from_field: str, sender: str, name: str) -> None:
    fields = headers.parse_fields(f"From: {from_field}\r\n".encode())
    assert headers.sender_name(fields, sender) == name


def test_the_received_field_dates_the_message_to_its_second() -> None:
    """outgoing.received_date keeps one text per second; a new second gets its own."""

    def field(at: datetime) -> str:
        message = new_row(Message, id="m1", received_at=at, helo="pc", peer="192.0.2.7",
                          protocol="ESMTPA", trusted_client=None)  # fmt: skip
        return received_field(message, "relay.example").decode("ascii")

    first = datetime(2026, 12, 5, 13, 2, 59, 999_999, tzinfo=UTC)
    assert "; Sat, 05 Dec 2026 13:02:59 +0000" in " ".join(field(first).split())
    assert field(first.replace(microsecond=1)) == field(first)
    assert "13:03:00 +0000" in field(datetime(2026, 12, 5, 13, 3, tzinfo=UTC))


@given(
    st.lists(st.sampled_from([b"a", b":", b" ", b"\r", b"\n", b"\r\n"]), max_size=40),
    st.integers(0, 60),
    st.integers(0, 60),
)
def test_offsets_of_a_window_are_those_of_its_copy(
    pieces: list[bytes], start: int, length: int
) -> None:
    raw = b"".join(pieces)
    start = min(start, len(raw))
    end = min(start + length, len(raw))
    header_end, body_start = headers.split_offsets(raw[start:end])
    assert headers.split_offsets(raw, start, end) == (start + header_end, start + body_start)
