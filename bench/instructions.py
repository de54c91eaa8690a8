"""Instructions per message of the SMTP front, the mail code's two passes, the send to the
smart host and the group commit's writes, counted by callgrind: a figure that does not move
with the machine's load.

    .venv/bin/python bench/instructions.py
    .venv/bin/python bench/instructions.py --stages intake --messages 600

On a shared box the CPU time of one small message's step moves by a fifth between runs, more
than most changes to it save. Here each stage runs under valgrind's callgrind, which counts
the instructions executed; only those inside the loop over the messages are counted (the
imports, the key and the messages made before it are not), so the same code gives the same
count, run after run, within a few hundred instructions.

- **intake**: what the pipeline does with a message's bytes before the plan (its fields
  read and checked, the copy's base without our control fields, the MIME tree, the parts'
  facts, the names and subject): gateway/intake/pipeline.py's parsing, without the database.
- **front**: a submission session as an agent's client holds it (greeting, EHLO, MAIL,
  RCPT, DATA with the message, QUIT) in gateway/fronts/smtp_protocol.py, each command
  answered before the next is written, behind bench/front.py's handler, which answers at
  once (the pipeline is the intake stage's). The bytes come and go through a transport in
  memory, so the kernel's side of the sockets is not counted; the event loop's is.
- **copy**: what delivery does to a small copy before it leaves (gateway/mail/outgoing.py:
  trace fields, loop mark, body hash, DKIM signature). The RSA step itself is left out (a
  stand-in key returns fixed bytes): it is OpenSSL's, about 0.4 ms a signature here, the
  same for every change to our code; bench/dkim.py times it.
- **send**: a small copy handed to the smart host over a kept connection
  (gateway/outbound/upstream.py and smtp_connection.py: the connection taken from the
  cache, MAIL, RCPT and the copy as one BDAT chunk in one write, the three replies read,
  the outcome, the connection kept again). The smart host is a transport in memory that
  answers each write with its three replies, as a server offering PIPELINING and CHUNKING
  does.
- **commit**: a small message's writes in the group commit (gateway/store/group_commit.py),
  on SQLite, `BATCH_OF` messages to a transaction as under load: intake's rows, inline blob
  and events; the claim; the hold before sending; the outcome with its event; the
  sequencer's pass that numbers and chains the events. SQLite's own work (the SQL, the
  pages) is counted with ours; its fsyncs are the kernel's and are not.

The messages are bench/relay.py's (5 KB, a text part and a PDF in base64), each header block
new, as in real traffic. Exit status 2 when valgrind is missing (apt-get install -y valgrind).
Under callgrind Python runs some 50 times slower: a stage takes about a minute.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Awaitable, Callable, Coroutine, Sequence  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any, cast  # noqa: E402

import uvloop  # noqa: E402
from sqlalchemy import Connection, create_engine, insert  # noqa: E402

from bench.front import LoggedIn, listener  # noqa: E402
from bench.harness import AGENT, make_body, make_header  # noqa: E402
from bench.options import comma_separated  # noqa: E402
from gateway.config import UpstreamSettings  # noqa: E402
from gateway.fronts.smtp_protocol import Listener  # noqa: E402
from gateway.intake.pipeline import STRIPPED_FIELDS, intake_events  # noqa: E402
from gateway.mail import dkim, headers, mime  # noqa: E402
from gateway.mail.outgoing import Signer, prepare  # noqa: E402
from gateway.outbound.queue import Claim, Hold, Settle, delivered, new_delivery  # noqa: E402
from gateway.outbound.smtp_connection import SmtpConnection  # noqa: E402
from gateway.outbound.upstream import KEPT, SmtpUpstream  # noqa: E402
from gateway.store import group_commit, journal, sequencer  # noqa: E402
from gateway.store.bulk import new_row  # noqa: E402
from gateway.store.models import Base, JournalHead, Message, new_id  # noqa: E402

STAGES = ("front", "intake", "copy", "send", "commit")
BATCH_OF = 20  # messages per group transaction: bench/relay.py's sessions
# callgrind counts from entering this C function to leaving it: the loop over the messages
COUNTED = "functools_reduce"


def messages(count: int, tag: str = "instructions") -> list[bytes]:
    """`count` messages, each header block its own (and its own from another `tag`'s)."""
    found = []
    for number in range(count):
        _, header = make_header(tag, number)
        found.append(header + make_body(5000, len(header)))
    return found


def intake(raw: bytes) -> None:
    fields = headers.fields_of(raw)
    headers.addresses(fields, "from")
    base = headers.remove_fields(raw, STRIPPED_FIELDS)
    root = mime.parse(base)
    headers.first_value(fields, "message-id")
    headers.decoded(headers.first_value(fields, "subject") or "")
    headers.sender_name(fields, AGENT)
    mime.part_facts(base, root)
    mime.is_signed(root)
    tuple((field.name, field.value) for field in fields)


class _MemoryTransport(asyncio.Transport):
    """A connection's two ends in memory: what the session writes is kept, and `reply`
    waits for a whole reply (its last line's code followed by a space)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False
        self._waiter: asyncio.Future[bytes] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 2525)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        if self._waiter is not None:
            self._answered(self._waiter)

    def _answered(self, waiter: asyncio.Future[bytes]) -> None:
        written = self.written
        last = written.rfind(b"\n", 0, len(written) - 1) + 1
        if written.endswith(b"\r\n") and written[last + 3 : last + 4] == b" ":
            waiter.set_result(bytes(written))
            written.clear()
            self._waiter = None

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    async def reply(self, sent: bytes) -> bytes:
        """What the session answers to `sent` (nothing sent: its greeting)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._answered(waiter)  # the greeting came before we waited
        if sent:
            cast(LoggedIn, self.protocol).data_received(sent)
        return await waiter


def conversation(raw: bytes) -> list[tuple[bytes, bytes]]:
    """What an agent's client writes to send `raw`, each with the reply code it expects."""
    return [
        (b"", b"220"),
        (b"EHLO client.bench.example\r\n", b"250"),
        (f"MAIL FROM:<{AGENT}>\r\n".encode(), b"250"),
        (b"RCPT TO:<prospect@sink.example>\r\n", b"250"),
        (b"DATA\r\n", b"354"),
        (re.sub(rb"(?m)^\.", b"..", raw) + b".\r\n", b"250"),
        (b"QUIT\r\n", b"221"),
    ]


async def session(shared: Listener, steps: list[tuple[bytes, bytes]]) -> None:
    """One message's submission session; a reply other than the one expected stops the
    count with the session's words."""
    protocol = LoggedIn(shared)
    transport = _MemoryTransport(protocol)
    protocol.connection_made(transport)
    for sent, code in steps:
        answer = await transport.reply(sent)
        if not answer.startswith(code):
            raise SystemExit(f"instructions: the front answered {answer!r} to {sent[:40]!r}")
    await protocol.closed.wait()


async def sessions(shared: Listener, found: list[list[tuple[bytes, bytes]]]) -> None:
    for steps in found:
        await session(shared, steps)


class _SmartHost(asyncio.Transport):
    """A smart host in memory offering PIPELINING and CHUNKING: each write must be one small
    copy's MAIL, RCPT and BDAT chunk, and is answered with their three replies."""

    REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as 1\r\n"

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.copies = 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[:11]) != b"MAIL FROM:<" or b"\r\nBDAT " not in data:
            raise SystemExit(f"instructions: the smart host got {bytes(data[:60])!r}")
        self.copies += 1
        protocol = cast(asyncio.Protocol, self.protocol)
        asyncio.get_running_loop().call_soon(protocol.data_received, self.REPLIES)


def smart_host_upstream(copies: int) -> tuple[SmtpUpstream, SmtpConnection, _SmartHost]:
    """The upstream, a connection to the smart host fit for `copies` copies, and the host.
    (Made outside the count: the upstream's TLS context reads the system's certificates.)"""
    settings = UpstreamSettings(
        url="smtp://sink.bench.example", connection_reuse_count_limit=copies + 1
    )
    upstream = SmtpUpstream(settings, "relay.bench.example")
    host = _SmartHost()
    connection = SmtpConnection(
        host,
        {"pipelining", "chunking", "8bitmime", "size"},
        remote="sink.bench.example",
        where=upstream.where,
        pipelining=True,
        chunking=True,
    )
    return upstream, connection, host


async def sends(upstream: SmtpUpstream, copies: list[bytes]) -> None:
    """Each copy to the smart host over the connection the upstream keeps."""
    for copy in copies:
        outcomes = await upstream.send(AGENT, ["prospect@sink.example"], copy)
        if not outcomes["prospect@sink.example"].delivered:
            raise SystemExit(f"instructions: a copy was not delivered: {outcomes}")


async def first_send(upstream: SmtpUpstream, connection: SmtpConnection, copy: bytes) -> None:
    """The connection kept, as after the copy that opened it, and one copy sent over it."""
    upstream.connections.keep(KEPT, connection)
    await sends(upstream, [copy])


class _FixedSignature:
    """Stands for the RSA key: its step is OpenSSL's and is not what is counted here."""

    key_size = 2048

    def sign(self, data: bytes, *args: object) -> bytes:
        return bytes(256)


def copier() -> Callable[[bytes], bytes]:
    key = object.__new__(dkim.DkimKey)  # no key check: the stand-in has no numbers
    for name, value in (("domain", "bench.example"), ("selector", "s1")):
        object.__setattr__(key, name, value)
    object.__setattr__(key, "private_key", _FixedSignature())
    signer = Signer({"bench.example": key})
    message = Message(
        id="0189a8c3d2e1f0a1b2c3d4e5",
        helo="client.bench.example",
        peer="127.0.0.1",
        protocol="ESMTPA",
        received_at=datetime(2026, 12, 6, 3, 0, tzinfo=UTC),
        message_id_header="<instructions@bench.example>",
        trusted_client=None,
    )

    def copy(raw: bytes) -> bytes:
        return prepare(raw, message, "relay.bench.example", signer, now=1_796_000_000)

    return copy


def committer(directory: Path) -> Callable[[list[tuple[bytes, str]]], None]:
    """The group commit's transactions for a batch of messages, on a SQLite file in
    `directory`, run on this thread (as on the driver's thread in the relay)."""
    engine = create_engine(f"sqlite:///{directory / 'commit.db'}")
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(JournalHead).values(id=1, seq=0, hash=journal.GENESIS))

    def transaction(work: Callable[[Connection], Any]) -> Any:
        with engine.begin() as connection:
            return work(connection)

    return lambda batch: commit_steps(batch, transaction, lambda _step: None)


def transactions_on(connection: Connection) -> Callable[[Callable[[Connection], Any]], Any]:
    """`commit_steps`'s `transaction` on one connection, each step its own transaction."""

    def transaction(work: Callable[[Connection], Any]) -> Any:
        with connection.begin():
            return work(connection)

    return transaction


def commit_steps(
    batch: list[tuple[bytes, str]],
    transaction: Callable[[Callable[[Connection], Any]], Any],
    after: Callable[[str], None],
) -> None:
    """A batch's writes as the relay makes them, each step its own transaction run by
    `transaction`; `after(step)` once each step has committed (bench/pg_commit.py reads
    the server's CPU there)."""
    now = datetime.now(UTC)
    lease = timedelta(minutes=5)

    def units(found: Sequence[group_commit.Unit[Any]]) -> list[Any]:
        results, _ = transaction(lambda connection: group_commit._all_at_once(connection, found))
        return cast(list[Any], results)

    inserts = []
    for raw, digest in batch:
        message = new_row(
            Message,
            id=new_id(),
            received_at=now,
            sender=AGENT,
            user_id=None,
            blob=digest,
            size=len(raw),
            message_id_header=f"<{digest[:16]}@bench.example>",
            subject="Commit",
            sender_name="Agent",
            helo="client.bench.example",
            peer="127.0.0.1",
            protocol="ESMTP",
            trusted_client=None,
            trusted_entry=None,
        )
        delivery = new_delivery(message.id, "prospect@sink.example", digest, now, 86400)
        events = intake_events(message, [delivery.recipient], [delivery])
        inserts.append(group_commit._Insert([message, delivery], events, now, {digest: raw}))
    units(inserts)
    after("intake")
    (claimed,) = units([Claim("bench", now, lease, len(batch))])
    after("claim")
    units([Hold("bench", [c.delivery.id for c in claimed], now + lease)])
    after("hold")
    units([Settle("bench", now, [delivered(c.delivery, "250 2.0.0 Ok")]) for c in claimed])
    after("settle")
    transaction(lambda connection: sequencer._chain(connection, sequencer.BATCH, True))
    after("chain")


def run_stage(stage: str, count: int) -> None:
    """The stage over `count` new messages, inside the one call callgrind counts."""
    if stage == "commit":
        with tempfile.TemporaryDirectory() as directory:
            commit = committer(Path(directory))
            # digested before: the intake's, not the commit's work
            found = [(raw, hashlib.sha256(raw).hexdigest()) for raw in messages(BATCH_OF + count)]
            commit(found[:BATCH_OF])  # statements compiled, caches filled: not counted
            batches = [found[i : i + BATCH_OF] for i in range(BATCH_OF, len(found), BATCH_OF)]
            functools.reduce(lambda _, batch: commit(batch), batches, None)
        return
    if stage == "front":
        shared = listener()
        steps = [conversation(raw) for raw in messages(count + 1)]
        _on_a_loop(session(shared, steps[0]), lambda: sessions(shared, steps[1:]))
        return
    if stage == "send":
        found = messages(count + 1)
        upstream, connection, _ = smart_host_upstream(count + 1)
        _on_a_loop(first_send(upstream, connection, found[0]), lambda: sends(upstream, found[1:]))
        return
    work: Callable[[bytes], object] = intake if stage == "intake" else copier()
    functools.reduce(lambda _, raw: work(raw), messages(count), None)


def _on_a_loop(first: Coroutine[Any, Any, None], rest: Callable[[], Awaitable[None]]) -> None:
    """`first` (imports done, caches filled: not counted), then `rest` counted, on uvloop as
    in the relay; in one run of the loop, since each run sets up its signal handling anew."""
    loop = uvloop.new_event_loop()
    loop.run_until_complete(first)
    functools.reduce(lambda _, __: loop.run_until_complete(rest()), [1], None)
    loop.close()


def counted(stage: str, count: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("instructions: valgrind is missing: apt-get install -y valgrind", file=sys.stderr)
        raise SystemExit(2)
    done = subprocess.run(
        [
            valgrind,
            "--tool=callgrind",
            "--collect-atstart=no",
            f"--toggle-collect={COUNTED}",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--inner",
            stage,
            "--messages",
            str(count),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"instructions: the {stage} stage failed under callgrind")
    return int(found.group(1))


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--stages",
        type=comma_separated(STAGES),
        default=",".join(STAGES),
        help="comma-separated: " + ", ".join(STAGES),
    )
    parser.add_argument("--messages", type=int, default=300, help="messages per stage")
    parser.add_argument("--inner", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages: at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.inner is not None:  # under callgrind
        run_stage(args.inner, args.messages)
        return 0
    print(f"instructions: {args.messages} messages of about 5 KB per stage, under callgrind")
    for stage in args.stages:
        total = counted(stage, args.messages)
        print(f"  {stage:7} {total // args.messages:>10,} instructions per message", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
