"""The read model at size: an agent with 100,000 messages, the timeline and the event feed.

    .venv/bin/python bench/api.py
    .venv/bin/python bench/api.py --messages 100000 --postgres postgresql+asyncpg://postgres@127.0.0.1/test

Seeds MESSAGES messages for one agent (each with one delivered copy and its three journal
events, chained as the journal chains them) with bulk inserts, plus 1,000 messages of other
agents mixed in, then starts `sealrelay serve --roles web` on a free port with a key and measures
through HTTP, ROUNDS times each:

- the timeline's first page (`GET /api/v1/messages?limit=50`),
- a deep page (the cursor of the message half-way down),
- the event feed returning 1,000 events (`GET /api/v1/events?after=N&limit=1000`),
- text searches (common, a few hundred, one recipient, none) and a filter by each state,
  each of which about 1,000 of the agent's messages are in (a quarter of the rounds each),

then the timeline's first page and the 1,000 events from the desk alone, without HTTP, the
key check and JSON, and prints p50/p95 in milliseconds. Targets: timeline < 300 ms p95,
1,000 events < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from sqlalchemy import insert, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import users  # noqa: E402
from gateway.access import MessageScope  # noqa: E402
from gateway.console.api_keys import ApiKeyDesk  # noqa: E402
from gateway.console.timeline import RecipientState, Timeline, encode_cursor  # noqa: E402
from gateway.store.db import Database  # noqa: E402
from gateway.store.journal import event_hash  # noqa: E402
from gateway.store.models import (  # noqa: E402
    ApiKeyScope,
    Consent,
    Delivery,
    Event,
    JournalHead,
    Letter,
    Link,
    Message,
    utcnow,
)

# common (a page at once), some hundreds, one recipient, none
SEARCHES = ("objekt", "objekt 99", "prospect4711@", "nirgendwo")
SEALRELAY = str(Path(sys.executable).parent / "sealrelay")
BATCH = 5000
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# One agent message in a hundred each ends in one of these (by its number modulo 100), so
# every state filter has about 1,000 messages to find; the rest are delivered.
FATES = {
    1: "bounced",
    2: "queued",
    3: "deleted",
    4: "letter_held",
    5: "letter_expired",
    6: "consented",
    7: "released",
    8: "link_expired",
}


def _fate_rows(
    fate: str, message_id: str, recipient: str, at: datetime
) -> list[tuple[str, dict[str, Any]]]:
    """The letter, link, consent and released copy rows that a fate adds to a message's one
    delivered copy (the letter itself, or the mail with its download link)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    link_id = secrets.token_hex(16)
    link = dict(id=link_id, token_hash=secrets.token_hex(32), message_id=message_id,
                recipient=recipient, language="de", created_at=at, expires_at=at,
                expired=False, revoked_at=None)  # fmt: skip
    if fate == "link_expired":
        rows.append(("links", {**link, "kind": "download", "expired": True}))
    if not fate.startswith("letter") and fate not in ("consented", "released"):
        return rows
    rows.append(("links", {**link, "kind": "letter"}))
    status = {"letter_held": "held", "letter_expired": "expired"}.get(fate, "released")
    letter_id = secrets.token_hex(16)
    rows.append(
        ("letters", dict(id=letter_id, message_id=message_id, recipient=recipient,
                         link_id=link_id, letter_blob="0" * 64, status=status, language="de",
                         subject="Exposé", blocks=[], button="OK", texts_sha256="0" * 64,
                         held_blob="0" * 64, created_at=at))
    )  # fmt: skip
    if status == "released":
        released_id = secrets.token_hex(16)
        rows.append(
            ("deliveries", dict(id=released_id, message_id=message_id, recipient=recipient,
                                blob="0" * 64, attempts=1, next_attempt_at=at, expires_at=at,
                                updated_at=at,
                                status="delivered" if fate == "released" else "queued"))
        )  # fmt: skip
        rows.append(
            ("consents", dict(id=secrets.token_hex(16), letter_id=letter_id, given_at=at,
                              ip="192.0.2.1", user_agent="bench", blocks=[], checked=[],
                              texts_sha256="0" * 64, letter_sent_at=at, pdf_blob="0" * 64,
                              released_delivery_id=released_id))
        )  # fmt: skip
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def seed(
    db: Database, agent_id: int, other_id: int, count: int
) -> list[tuple[datetime, str]]:
    """Bulk rows for `count` messages of the agent and 1,000 of another, in time order."""
    async with db.transaction() as session:
        head = (await session.execute(text("SELECT seq, hash FROM journal_head"))).one()
    seq, prev = int(head[0]), str(head[1])
    positions: list[tuple[datetime, str]] = []
    total = count + 1000
    every = max(1, total // 1000)
    for start in range(0, total, BATCH):
        messages: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        others: dict[str, list[dict[str, Any]]] = {"links": [], "letters": [], "deliveries": [],
                                                   "consents": []}  # fmt: skip
        for i in range(start, min(total, start + BATCH)):
            mine = i % every != 0 or i >= count + 1000
            at = T0 + timedelta(seconds=30 * i)
            message_id = f"{int(at.timestamp() * 1000):012x}{secrets.token_hex(4)}"
            delivery_id = f"{int(at.timestamp() * 1000):012x}{secrets.token_hex(4)}"
            recipient = f"prospect{i}@example.com"
            subject = f"Exposé Objekt {i}"
            messages.append(
                dict(id=message_id, kind="submitted", received_at=at, sender="agent@bench.example",
                     user_id=agent_id if mine else other_id, blob="0" * 64, size=5000,
                     message_id_header=f"<{message_id}@bench>", subject=subject, helo="", peer="",
                     protocol="ESMTP")
            )  # fmt: skip
            fate = FATES.get(i % 100, "delivered") if mine else "delivered"
            status = fate if fate in ("bounced", "queued", "deleted") else "delivered"
            deliveries.append(
                dict(id=delivery_id, message_id=message_id, recipient=recipient, blob="0" * 64,
                     status=status, attempts=1, next_attempt_at=at, expires_at=at,
                     updated_at=at)
            )  # fmt: skip
            extra = _fate_rows(fate, message_id, recipient, at)
            for table, row in extra:
                others[table].append(row)
            if mine:
                positions.append((at, message_id))
            for type_, data, delivery in (
                ("message.received", {"sender": "agent@bench.example", "recipients": [recipient],
                                      "size": 5000, "subject": subject,
                                      "message_id": f"<{message_id}@bench>",
                                      "user_id": agent_id, "peer": "127.0.0.1"}, None),
                ("delivery.queued", {"recipient": recipient}, delivery_id),
                ("delivery.delivered", {"recipient": recipient, "attempt": 1, "remote": None},
                 delivery_id),
            ):  # fmt: skip
                seq += 1
                digest = event_hash(prev, seq, at, type_, message_id, delivery, data)
                events.append(
                    dict(seq=seq, at=at, type=type_, message_id=message_id, delivery_id=delivery,
                         data=data, prev_hash=prev, hash=digest)
                )  # fmt: skip
                prev = digest
        async with db.transaction() as session:
            await session.execute(insert(Message), messages)
            await session.execute(insert(Delivery), deliveries + others["deliveries"])
            for model, table in ((Link, "links"), (Letter, "letters"), (Consent, "consents")):
                if others[table]:
                    await session.execute(insert(model), others[table])
            await session.execute(insert(Event), events)
    async with db.transaction() as session:
        await session.execute(
            update(JournalHead).where(JournalHead.id == 1).values(seq=seq, hash=prev)
        )
    positions.sort(reverse=True)
    return positions


async def wait_for_health(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    sys.exit("the relay did not start")


async def desk_timed(call: Callable[[], Awaitable[object]], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def figures(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"{label:<42} p50 {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms"


async def timed(http: aiohttp.ClientSession, url: str, rounds: int, check: Any) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with http.get(url) as response:
            raw = await response.read()
        samples.append((time.perf_counter() - started) * 1000)  # the client's parsing aside
        body = json.loads(raw)
        assert response.status == 200, body
        check(body)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL database to fill (emptied)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sealrelay-bench-api-"))
    if args.postgres:
        name = f"sealrelay_bench_{secrets.token_hex(4)}"
        admin = create_async_engine(args.postgres, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite+aiosqlite:///{work}/relay.db"
    db = Database.connect(url)
    try:
        await db.upgrade()
        agent = await users.add_user(db, "agent@bench.example", "bench password 2026")
        other = await users.add_user(db, "other@bench.example", "bench password 2026")
        started = time.perf_counter()
        positions = await seed(db, agent.id, other.id, args.messages)
        seeded = time.perf_counter() - started
        if db.is_postgres:
            async with db.engine.begin() as conn:
                await conn.execute(text("ANALYZE"))
        print(f"backend {db.engine.dialect.name}: seeded {len(positions)} messages of the agent"
              f" (+1000 of another) in {seeded:.1f} s")  # fmt: skip
        key = await ApiKeyDesk(db, utcnow).create("bench", ApiKeyScope.WRITE, "bench")
        port = free_port()
        config = work / "relay.toml"
        config.write_text(
            f'[server]\nhostname = "relay.bench.example"\n[database]\nurl = "{url}"\n'
            f'[web]\nlisten = "127.0.0.1:{port}"\n[storage]\npath = "{work / "blobs"}"\n'
            "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
            '[branding]\ncompany_name = "Bench Immobilien GmbH"\n'
            '[letter]\ncompany_address = "x"\ncompany_email = "x@bench.example"\n'
            'company_phone = "1"\ncommission = "1 %"\n',
            encoding="utf-8",
        )
        server = await asyncio.create_subprocess_exec(  # a process of its own, as it runs
            SEALRELAY, "serve", "-c", str(config), "--roles", "web",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's code
        )  # fmt: skip
        await wait_for_health(f"http://127.0.0.1:{port}/healthz")
        base = f"http://127.0.0.1:{port}/api/v1"
        deep_at, deep_id = positions[len(positions) // 2]
        deep = encode_cursor(deep_at, deep_id)
        head_seq = 3 * (args.messages + 1000)
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {key.key}"}
            ) as http:
                for _ in range(3):  # warm caches and connections
                    async with http.get(base + "/messages?limit=50") as r:
                        await r.read()
                first = await timed(
                    http, base + "/messages?limit=50", args.rounds,
                    lambda b: len(b["items"]) == 50 or sys.exit("short page"),
                )  # fmt: skip
                deeper = await timed(
                    http, base + f"/messages?limit=50&cursor={deep}", args.rounds,
                    lambda b: b["items"][0]["received_at"] < deep_at.isoformat()
                    or len(b["items"]) == 50 or sys.exit("bad deep page"),
                )  # fmt: skip
                feed = await timed(
                    http, base + f"/events?after={head_seq // 2}&limit=1000", args.rounds,
                    lambda b: len(b["events"]) == 1000 or sys.exit("short feed"),
                )  # fmt: skip
                searches = {
                    words: await timed(
                        http, base + f"/messages?limit=50&q={quote(words)}", args.rounds // 4 or 1,
                        lambda b: None,
                    )
                    for words in SEARCHES
                }  # fmt: skip
                by_state = {
                    state: await timed(
                        http, base + f"/messages?limit=50&state={state}", args.rounds // 4 or 1,
                        lambda b, state=state: b["items"] or sys.exit(f"no message {state}"),
                    )
                    for state in RecipientState
                }  # fmt: skip
            timeline = Timeline(db)
            everything = MessageScope(everything=True)
            agent_only = MessageScope(user_id=agent.id)
            desk_page = await desk_timed(
                lambda: timeline.messages(agent_only, limit=50), args.rounds
            )
            desk_feed = await desk_timed(
                lambda: timeline.events(everything, after_seq=head_seq // 2, limit=1000),
                args.rounds,
            )
        finally:
            server.terminate()
            await server.wait()
        print(figures("timeline, first page (50)", first))
        print(figures("timeline, page half-way down (50)", deeper))
        print(figures("events, 1,000 from the middle", feed))
        for words, samples in searches.items():
            print(figures(f"timeline, text search '{words}'", samples))
        for state, samples in by_state.items():
            print(figures(f"timeline, state={state}", samples))
        print("the desk alone (no HTTP, no key check, no JSON):")
        print(figures("timeline, first page (50)", desk_page))
        print(figures("events, 1,000 from the middle", desk_feed))
    finally:
        await db.close()
        if args.postgres:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
