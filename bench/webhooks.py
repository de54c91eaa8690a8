"""Webhook benchmark: fan-out and delivery to a local receiver while the relay takes mail.

    .venv/bin/python bench/webhooks.py --messages 1000 --sessions 10
    .venv/bin/python bench/webhooks.py --messages 500 --backend postgres

Runs `bench/relay.py`'s setup twice, a real `sealrelay serve` subprocess and a counting SMTP
sink in a child process: first without a webhook endpoint (the baseline), then with one
endpoint receiving every event (`sealrelay webhook add --allow-private`), posted to an aiohttp
receiver in this process that counts each `webhook-id` and checks the first signature with
the `standardwebhooks` package. Each message makes three events (message.received,
delivery.queued, delivery.delivered).

Prints, per run: mail accepted and delivered msg/s and p50/p99 time to 250; with webhooks
also the events posted per second (from the first MAIL FROM to the last event received), how
long after the last mail delivery the last event arrived, and duplicates and losses by
webhook-id. The target: events/s at least 3 x the relay's own message rate, and mail rates
within noise of the baseline. Exits 1 if a message or an event was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import relay as base  # noqa: E402

EVENTS_PER_MESSAGE = 3


@dataclass
class Counter:
    """The receiver's tally: each webhook-id with how often it came, and when the first time."""

    ids: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    secret: str = ""
    verified: bool | None = None
    wanted: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers["webhook-id"]
        if self.verified is None and self.secret:
            from standardwebhooks import Webhook

            try:
                Webhook(self.secret).verify(body, dict(request.headers))
                self.verified = True
            except Exception:
                self.verified = False
        self.ids[webhook_id] = self.ids.get(webhook_id, 0) + 1
        if webhook_id not in self.first_seen:
            self.first_seen[webhook_id] = time.perf_counter()
            message = json.loads(body)["data"]["message_id"]
            if message is not None:
                self.messages[message] = self.messages.get(message, 0) + 1
        if self.wanted and len(self.messages_complete()) >= self.wanted:
            self.done.set()
        return web.Response(status=204)

    def messages_complete(self) -> list[str]:
        return [m for m, n in self.messages.items() if n >= EVENTS_PER_MESSAGE]


async def start_receiver(counter: Counter, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/hooks", counter.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def add_endpoint(config: Path, url: str) -> str:
    done = subprocess.run(
        [base.sealrelay_command(), "webhook", "add", url, "--allow-private", "-c", str(config)],
        text=True,
        check=True,
        capture_output=True,
        env=base.child_environment(),
        timeout=60,
    )
    return done.stdout.split("secret: ")[1].split()[0]


async def run(args: argparse.Namespace, webhooks: bool) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="sealrelay-bench-webhooks-"))
    loop = asyncio.get_running_loop()
    tally = base.Tally()
    counter = Counter()
    smtp_port, web_port, sink_port, hook_port = (base.free_port() for _ in range(4))
    log = directory / "relay.log"
    receiver = await start_receiver(counter, hook_port)
    try:
        async with base.database_url(args.backend, directory) as db_url:
            config = base.write_config(
                directory, db_url, (smtp_port, web_port, sink_port), args.size, False
            )
            await asyncio.to_thread(base.add_agent, config)
            if webhooks:
                url = f"http://127.0.0.1:{hook_port}/hooks"
                counter.secret = await asyncio.to_thread(add_endpoint, config, url)
            with base.sink_process(sink_port, tally, loop), log.open("wb") as out:
                relay = await asyncio.create_subprocess_exec(
                    base.sealrelay_command(),
                    "serve",
                    "--config",
                    str(config),
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=base.child_environment(),
                )
                try:
                    await base.wait_ready(relay, web_port, log)
                    clients = await base.open_sessions(args.sessions, smtp_port)
                    results = await base.send_all(
                        clients, args.messages, args.size, secrets.token_hex(4)
                    )
                    tally.wanted = set(results.accepted)
                    tally.check()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(tally.done.wait(), args.timeout)
                    mail_done = tally.complete_at() or time.perf_counter()
                    figures: dict[str, Any] = {
                        "webhooks": webhooks,
                        "accepted": len(results.accepted),
                        "accepted_per_s": round(
                            len(results.accepted) / (results.last_250 - results.first_send), 1
                        ),
                        "delivered_per_s": round(
                            len(tally.wanted) / (mail_done - results.first_send), 1
                        ),
                        "p50_ms": round(base.percentile(results.latencies, 0.5) * 1000, 1),
                        "p99_ms": round(base.percentile(results.latencies, 0.99) * 1000, 1),
                        "mail_lost": len(tally.wanted - tally.copies.keys()),
                    }
                    if webhooks:
                        counter.wanted = len(results.accepted)
                        if len(counter.messages_complete()) >= counter.wanted:
                            counter.done.set()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(counter.done.wait(), args.timeout)
                        last = max(counter.first_seen.values(), default=time.perf_counter())
                        events = len(counter.ids)
                        figures |= {
                            "events": events,
                            "events_per_s": round(events / (last - results.first_send), 1),
                            "lag_after_mail_s": round(max(0.0, last - mail_done), 2),
                            "event_duplicates": sum(n - 1 for n in counter.ids.values()),
                            "messages_missing_events": counter.wanted
                            - len(counter.messages_complete()),
                            "signature_verified": counter.verified,
                        }
                    return figures
                finally:
                    relay.terminate()
                    try:
                        await asyncio.wait_for(relay.wait(), 30)
                    except TimeoutError:
                        relay.kill()
                        await relay.wait()
    finally:
        await receiver.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


async def bench(args: argparse.Namespace) -> int:
    baseline = await run(args, webhooks=False)
    loaded = await run(args, webhooks=True)
    print(
        f"sealrelay webhooks bench: {args.messages} x {args.size} B over {args.sessions}"
        f" sessions ({args.backend})"
    )
    for name, f in (("without webhooks", baseline), ("with one endpoint", loaded)):
        print(
            f"  {name:<18} mail accepted {f['accepted_per_s']} msg/s, delivered"
            f" {f['delivered_per_s']} msg/s, time to 250 p50 {f['p50_ms']} ms"
            f" p99 {f['p99_ms']} ms, lost {f['mail_lost']}"
        )
    print(
        f"  webhook events     {loaded['events']} posted at {loaded['events_per_s']} events/s"
        f" ({loaded['events_per_s'] / max(loaded['delivered_per_s'], 0.1):.1f} x the mail rate);"
        f" last event {loaded['lag_after_mail_s']} s after the last mail;"
        f" duplicates {loaded['event_duplicates']},"
        f" messages missing events {loaded['messages_missing_events']},"
        f" signature verified {loaded['signature_verified']}"
    )
    if args.json:
        print(json.dumps({"baseline": baseline, "webhooks": loaded}))
    lost = baseline["mail_lost"] or loaded["mail_lost"] or loaded["messages_missing_events"]
    return 1 if lost else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    sys.exit(asyncio.run(bench(parser.parse_args())))


if __name__ == "__main__":
    main()
