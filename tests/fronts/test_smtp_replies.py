"""A reply on the wire holds RFC 5321's text whatever words of the client's it quotes."""

from __future__ import annotations

import pytest

from gateway.fronts.reply_text import printable


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        ("250 2.0.0 OK", "250 2.0.0 OK"),
        ("553 5.1.3 <a\x00b@x.example> bad\there", "553 5.1.3 <a?b@x.example> bad\there"),
        ("553 5.7.1 You may not send as bö\x7fss", "553 5.7.1 You may not send as b??ss"),
        # a line end in quoted text starts a continuation line of the reply's own code
        ("554 5.6.0 broken\r\n250 2.0.0 Ok: queued", "554-5.6.0 broken\r\n554 2.0.0 Ok: queued"),
        ("554 5.6.0 a\nb\rc", "554-5.6.0 a\r\n554-b\r\n554 c"),
        ("250-m\xe4kler.example", "250-m?kler.example"),  # a continuation line stays one
        ("250-a\r\n250-b", "250-a\r\n250-b"),
    ],
)
def test_a_reply_is_made_printable_line_by_line(reply: str, wire: str) -> None:
    assert printable(reply) == wire
    for line in wire.split("\r\n"):
        assert printable(line) == line
