"""The text of an SMTP reply as it may go on the wire, whoever gives the reply."""

from __future__ import annotations

import re

_UNPRINTABLE = re.compile(r"[^\t\x20-\x7e]")
_CODE = re.compile(r"[2-5][0-9][0-9][ -]")
_LINE_END = re.compile(r"\r\n|\r|\n")


def printable(reply: str) -> str:
    """`reply` (one line of a reply, `code text` or `code-text`) as RFC 5321 4.2 allows it
    on the wire: tab and printable US-ASCII only. Replies quote words of the client's (an
    address, a command, a From header), which may hold a control character, a line end or,
    in a header, any octet: each such character becomes `?`, and a line end inside the text
    starts a continuation line of the same code, so that nothing quoted can end the reply
    early or give it another code."""
    code, last = reply[:3], reply[3:4] if reply[3:4] == "-" else " "
    texts = [line[4:] if _CODE.match(line) else line for line in _LINE_END.split(reply)]
    end = len(texts) - 1
    return "\r\n".join(
        f"{code}{last if i == end else '-'}{_UNPRINTABLE.sub('?', text)}"
        for i, text in enumerate(texts)
    )
