"""aiosmtpd's server taught BDAT (RFC 3030), which it does not have: the sinks that stand for
Microsoft 365, Gmail and Postfix's smtpd, which offer CHUNKING.

The handler offers it in its `handle_EHLO`; a message that came in chunks reaches its
`handle_DATA` as one that came by DATA, with `envelope.chunks` the number of chunks (0: DATA).
"""

from __future__ import annotations

from typing import cast

from aiosmtpd.smtp import SMTP, Envelope


class ChunkedEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.chunks = 0
        self.octets: list[bytes] = []


class ChunkingSMTP(SMTP):
    def _create_envelope(self) -> Envelope:
        return ChunkedEnvelope()

    async def smtp_BDAT(self, arg: str) -> None:
        """A chunk's octets, read whatever the state (they are on the wire); the last one
        hands the message on. Without a recipient each chunk is refused and thrown away,
        as RFC 3030 4.2 has a receiver do with chunks pipelined after a failed one."""
        if await self.check_helo_needed():
            return
        size, _, last = arg.partition(" ")
        if not size.isdigit() or last.upper() not in ("", "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        octets = await self._reader.readexactly(int(size))
        envelope = cast(ChunkedEnvelope, self.envelope)
        if envelope.mail_from is None or not envelope.rcpt_tos:
            envelope.octets.clear()
            await self.push("503 5.5.1 Error: no valid recipients")
            return
        envelope.octets.append(octets)
        envelope.chunks += 1
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        content = b"".join(envelope.octets)
        envelope.octets.clear()
        envelope.content = envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status if isinstance(status, str) else "250 OK")
