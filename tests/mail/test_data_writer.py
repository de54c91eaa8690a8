"""DATA written in pieces: dot-stuffing must survive every piece boundary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.outbound.smtp_connection import stuffed_pieces
from tests.conftest import AGENT, StartRelay


def unstuff(wire: bytes) -> bytes:
    """What an RFC 5321 receiver makes of the pieces (before the terminator)."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 64])
def test_every_line_start_dot_is_doubled_across_pieces(size: int) -> None:
    data = b".first\r\n..two\r\nthree.\r\n.\r\nlast\r\n"
    pieces = list(stuffed_pieces(data, size))
    wire = b"".join(pieces)
    assert all(piece.endswith(b"\r\n") for piece in pieces)
    assert b"\r\n.\r\n" not in b"\r\n" + wire  # the data can never end early
    assert unstuff(wire) == data


def test_data_without_a_final_line_end_gets_one() -> None:
    assert b"".join(stuffed_pieces(b"a\r\nb")) == b"a\r\nb\r\n"
    assert list(stuffed_pieces(b"")) == []


@given(
    st.lists(st.sampled_from([b"", b".", b"..", b"x", b".x", b"x.", b"abc" * 40]), max_size=60),
    st.integers(min_value=1, max_value=300),
)
def test_stuffing_round_trips(lines: list[bytes], size: int) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    assert unstuff(b"".join(stuffed_pieces(data, size))) == data


async def test_dot_lines_reach_the_upstream_byte_for_byte(relay_factory: StartRelay) -> None:
    relay = await relay_factory(smtp={"max_message_size": 10 * 1024 * 1024})
    body = b"".join(b".%d leading dot\r\n..double\r\n" % i for i in range(40_000))
    raw = f"From: {AGENT}\r\nTo: p@example.com\r\nSubject: dots\r\n\r\n".encode() + body + b".\r\n"
    assert len(raw) > 3 * 256 * 1024
    await relay.send(raw, recipients=["p@example.com"])
    [copy] = await relay.sink.expect(1)
    assert copy.data.endswith(raw)
