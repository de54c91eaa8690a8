"""A minimal SMTP forwarder on sealrelay's own stack: the ceiling for any relay built on it.

    .venv/bin/python bench/forwarder.py --listen 127.0.0.1:2526 --upstream 127.0.0.1:2600

aiosmtpd takes the mail, aiosmtplib hands it on over kept connections, and the 250 goes back
once the upstream said 250 (so nothing is lost without a queue). Nothing is stored, signed,
parsed, checked or journaled, and no fsync is made: what sealrelay does on top costs more
CPU, never less. `bench/compare.py --forwarder` runs it beside Postfix and sealrelay under
the same load, so that issue 18's ratios can be read against what this stack gives at all.
It runs on uvloop when installed, as `sealrelay serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_SIZE = 64 * 1024 * 1024


class Forward:
    """aiosmtpd's handler: each message goes upstream on one of `connections` kept
    connections before the client gets its 250."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.clients: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        for _ in range(connections):
            self.clients.put_nowait(
                aiosmtplib.SMTP(hostname=host, port=port, local_hostname="forwarder.localhost")
            )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = await self.clients.get()
        try:
            if not client.is_connected:
                await client.connect()
            content = envelope.original_content or b""
            await client.sendmail(envelope.mail_from or "", envelope.rcpt_tos, content)
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            return f"451 4.4.1 upstream: {exc}"
        finally:
            self.clients.put_nowait(client)
        return "250 2.0.0 Ok"


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int], connections: int) -> None:
    handler = Forward(*upstream, connections)
    loop = asyncio.get_running_loop()

    def session() -> SMTP:
        return SMTP(handler, data_size_limit=MAX_SIZE, hostname="forwarder.localhost")

    server = await loop.create_server(session, *listen)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"forwarder: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", type=address, required=True, help="HOST:PORT to take mail")
    parser.add_argument("--upstream", type=address, required=True, help="HOST:PORT to send to")
    parser.add_argument(
        "--connections", type=int, default=20, help="kept upstream connections (default 20)"
    )
    args = parser.parse_args()
    run: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    run(serve(args.listen, args.upstream, args.connections))


if __name__ == "__main__":
    main()
