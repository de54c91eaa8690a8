"""The console's timeline page at size: an agent with 100,000 messages, rendered as HTML.

    .venv/bin/python bench/console.py
    .venv/bin/python bench/console.py --messages 100000 --postgres postgresql+asyncpg://postgres@127.0.0.1/test

Seeds the messages as bench/api.py does, starts the relay's web role, signs the agent in
through the console's own form, and measures through HTTP, ROUNDS times each:

- the timeline page (`GET /console/messages`, 50 rows with their recipients' states),
- an "older" page half-way down (`?after=<cursor>`),
- one message's page (`GET /console/messages/<id>`),
- the timeline filtered by each state and searched for texts as in bench/api.py (a quarter
  of the rounds each),

and prints p50/p95 in milliseconds. Target: the timeline page < 300 ms p95.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import SEARCHES, figures, free_port, seed  # noqa: E402
from gateway import users  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.console.timeline import RecipientState, encode_cursor  # noqa: E402
from gateway.store.db import Database  # noqa: E402
from sealrelay.serve import Relay  # noqa: E402

PASSWORD = "bench password 2026"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def timed(http: aiohttp.ClientSession, url: str, rounds: int, expect: str) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with http.get(url, allow_redirects=False) as response:
            body = await response.text()
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status == 200 and expect in body, (response.status, body[:300])
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL database to fill (emptied)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sealrelay-bench-console-"))
    if args.postgres:
        schema = f"bench_{secrets.token_hex(4)}"
        admin = Database.connect(args.postgres)
        async with admin.engine.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {schema}"))
        db = Database.connect(args.postgres, schema=schema)
        url = args.postgres
    else:
        url = f"sqlite+aiosqlite:///{work}/relay.db"
        db = Database.connect(url)
    try:
        await db.upgrade()
        agent = await users.add_user(db, "agent@bench.example", PASSWORD)
        other = await users.add_user(db, "other@bench.example", PASSWORD)
        started = time.perf_counter()
        positions = await seed(db, agent.id, other.id, args.messages)
        print(f"backend {db.engine.dialect.name}: seeded {len(positions)} messages of the agent"
              f" (+1000 of another) in {time.perf_counter() - started:.1f} s")  # fmt: skip
        if db.is_postgres:
            async with db.engine.begin() as conn:
                await conn.execute(text("ANALYZE"))
        port = free_port()
        settings = Settings.model_validate(
            {
                "server": {"hostname": "relay.bench.example",
                           "public_url": f"http://127.0.0.1:{port}"},
                "database": {"url": url},
                "web": {"listen": f"127.0.0.1:{port}"},
                "storage": {"path": str(work / "blobs")},
                "branding": {"company_name": "Bench Immobilien GmbH"},
                "letter": {"company_address": "x", "company_email": "x@bench.example",
                           "company_phone": "1", "commission": "1 %"},
            }
        )  # fmt: skip
        relay = Relay(settings, roles=["web"], db=db)
        await relay.start()
        base = f"http://127.0.0.1:{port}"
        deep_at, deep_id = positions[len(positions) // 2]
        try:
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                async with http.get(base + "/console/login") as page:
                    [token] = CSRF.findall(await page.text())
                async with http.post(
                    base + "/console/login",
                    data={
                        "csrf": token,
                        "next": "/console/",
                        "email": "agent@bench.example",
                        "password": PASSWORD,
                    },
                    allow_redirects=False,
                ) as answer:
                    assert answer.status == 303, await answer.text()
                for _ in range(3):  # warm caches and connections
                    async with http.get(base + "/console/messages") as r:
                        await r.read()
                first = await timed(http, base + "/console/messages", args.rounds, "Exposé Objekt")
                deeper = await timed(
                    http,
                    base + f"/console/messages?after={encode_cursor(deep_at, deep_id)}",
                    args.rounds,
                    "Exposé Objekt",
                )
                one = await timed(
                    http, base + f"/console/messages/{deep_id}", args.rounds, "prospect"
                )
                by_state = {
                    state: await timed(
                        http,
                        base + f"/console/messages?state={state}",
                        args.rounds // 4 or 1,
                        "Exposé Objekt",
                    )
                    for state in RecipientState
                }
                searches = {
                    words: await timed(
                        http,
                        base + f"/console/messages?q={quote(words)}",
                        args.rounds // 4 or 1,
                        "</html>",
                    )
                    for words in SEARCHES
                }
        finally:
            relay.request_stop()
            await relay.stop()
        print(figures("console timeline page (50 rows)", first))
        print(figures("console timeline, older page at the middle", deeper))
        print(figures("console message page", one))
        for state, samples in by_state.items():
            print(figures(f"console timeline, state={state}", samples))
        for words, samples in searches.items():
            print(figures(f"console timeline, search '{words}'", samples))
    finally:
        if args.postgres:
            async with admin.engine.begin() as conn:
                await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
