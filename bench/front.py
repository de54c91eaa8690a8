"""The SMTP front's own CPU per message: the session protocol with a handler that answers
at once, no pipeline, no database.

    .venv/bin/python bench/front.py --messages 3000 --sessions 20

A connection per message (greeting, EHLO, MAIL, RCPT, DATA of about 5 KB, QUIT), from
clients in this process; the front runs in a child process, whose CPU alone is counted from
its first connection to its last.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

import uvloop

from gateway.config import SmtpSettings
from gateway.fronts.smtp_guard import ConnectionGate
from gateway.fronts.smtp_protocol import Listener, SubmissionSMTP
from gateway.login_throttle import FailedLogins

BODY = b"Subject: bench\r\n\r\n" + (b"y" * 76 + b"\r\n") * 64 + b".\r\n"


class Agent:
    email = "agent@bench.example"

    def may_send_as(self, address: str) -> bool:
        return True


class Handler:
    """Says yes to everything at once: what is left is the front's own work."""

    async def authenticate(self, session: SubmissionSMTP, mechanism: str, args: list[str]) -> None:
        session.reply("235 2.7.0 Authentication successful")

    def agent_sender(self, session: SubmissionSMTP, address: str, options: list[str]) -> str:
        session.mail_from = address
        return "250 2.1.0 Ok"

    async def trusted_sender(
        self, session: SubmissionSMTP, address: str, options: list[str]
    ) -> None:
        session.reply("250 2.1.0 Ok")

    def recipient(self, session: SubmissionSMTP, address: str, options: list[str]) -> str:
        session.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, session: SubmissionSMTP, raw: bytes) -> str:
        return "250 2.0.0 Ok: queued as 1"

    def handle_exception(self, error: Exception) -> str:
        raise error


class LoggedIn(SubmissionSMTP):
    """A session whose agent has logged in, as after AUTH."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.agent = Agent()  # type: ignore[assignment]


def listener() -> Listener:
    """The shipped SMTP settings, with `Handler` behind them."""
    gate = ConnectionGate(SmtpSettings(), FailedLogins(budget=100, forget_seconds=60.0), 1000)
    return Listener(
        handler=Handler(), gate=gate, hostname="bench", timeout=300, size_limit=10_000_000
    )


async def serve(port: int, messages: int) -> None:
    ended = asyncio.Event()
    count = 0

    class Session(LoggedIn):
        def connection_lost(self, error: Exception | None) -> None:
            nonlocal count
            super().connection_lost(error)
            count += 1
            if count >= messages:
                ended.set()

    shared = listener()
    server = await asyncio.get_running_loop().create_server(
        lambda: Session(shared), "127.0.0.1", port
    )
    print("ready", flush=True)
    started = time.process_time()
    await ended.wait()
    cpu = time.process_time() - started
    print(f"front: {cpu * 1000 / messages:.3f} ms CPU per message ({messages} connections)")
    server.close()


async def send(port: int, messages: int, sessions: int) -> None:
    left = messages

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def answer() -> bytes:
            while True:
                line = await reader.readline()
                if line[3:4] != b"-":
                    return line

        await answer()
        for command in (b"EHLO c", b"MAIL FROM:<agent@bench.example>", b"RCPT TO:<p@x.example>"):
            writer.write(command + b"\r\n")
            assert (await answer()).startswith(b"250"), command
        writer.write(b"DATA\r\n")
        assert (await answer()).startswith(b"354")
        writer.write(BODY)
        assert (await answer()).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await answer()
        writer.close()

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(client() for _ in range(sessions)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.messages))
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    front = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--messages", str(args.messages)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert front.stdout is not None
    assert front.stdout.readline().strip() == "ready"
    uvloop.run(send(port, args.messages, args.sessions))
    print(front.stdout.read().strip())
    front.wait()


if __name__ == "__main__":
    main()
