"""bench/relay.py --web-rps R: small mail's time to 250 with and without prospects on the web.

Issue 18's target: prospects' page views and downloads at 50 requests/s must not raise the
small-mail p99 time to 250 above its target. Before the turns, two seed mails go through the
relay: one with a linked file (`--web-file-kib`; attachments over half of it become links in
this mode) and a registered letter (`[Offer]` in the subject); their copies reach the sink
whole (`SEED` recipients), and the download page's, the file's and the letter's addresses
are read out of them. Then `--turns` turns of the same mail (`--messages` over `--sessions`
fresh logged-in sessions): without the web load, with it, in alternation. In a turn with it,
bench/web_load.py asks for the download page, the file, the letter page and the file again,
in that order, at `--web-rps` from a child process, from a second before the first MAIL FROM
until the sink has every message. Each answered view and download must show in the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

from bench.harness import (
    AGENT,
    DOMAIN,
    SEED,
    Tally,
    cpu_seconds,
    cpu_until_idle,
    database_state,
    open_sessions,
    percentile,
    relay_pids,
    send_all,
    wait_ready,
)
from bench.links import TOKEN, make_attachment, make_message
from bench.web_load import BROWSER, Outcome, Target, WebLoad

WARM_UP = 1.0  # seconds of web load before the mail, so the mail meets it at its rate
VISITS = ("link.viewed", "letter.viewed", "download.first", "download.repeat")


class Failed(Exception):
    """The figures would mean nothing: the bench says why and exits 1."""


@dataclass
class Turn:
    web: bool
    accepted: int
    refused: int
    lost: int
    accept_seconds: float
    deliver_seconds: float
    cpu_seconds: float
    load_average: float
    latencies: list[float] = field(default_factory=list)
    outcome: Outcome | None = None


def addresses(raw: bytes, public_url: str, kind: str) -> list[str]:
    """The `/{kind}/{token}` addresses in a copy's text parts (decoded)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    pattern = re.compile(re.escape(public_url) + rf"/{kind}/{TOKEN}(?![A-Za-z0-9_-])")
    found: list[str] = []
    for part in message.walk():
        if part.get_content_maintype() == "text" and not part.is_attachment():
            found += pattern.findall(part.get_content())
    return list(dict.fromkeys(found))


async def seed(
    smtp_port: int, public_url: str, tally: Tally, file_kib: int, seconds: float
) -> list[Target]:
    """The prospects' addresses, from a mail with a linked file and a registered letter."""
    tag = secrets.token_hex(4)
    size = file_kib * 1024
    file = make_attachment(size)
    mails = [
        (f"{SEED}download@example.com", "Grundriss", file, "grundriss.pdf"),
        (f"{SEED}letter@example.com", "[Offer] Villa am See", make_attachment(4096), "x.pdf"),
    ]
    (client,) = await open_sessions(1, smtp_port)
    async with client:
        for number, (recipient, subject, attachment, name) in enumerate(mails):
            message_id = f"<seed-{tag}-{number}@{DOMAIN}>"
            mail = make_message(message_id, [recipient], subject, attachment, name)
            await client.sendmail(AGENT, [recipient], mail)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while len(tally.kept) < len(mails):
        tally.kept_changed.clear()
        if (remaining := deadline - loop.time()) <= 0:
            raise Failed(f"{len(tally.kept)} of {len(mails)} seed copies reached the sink")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.kept_changed.wait(), remaining)
    pages = [a for raw in tally.kept for a in addresses(raw, public_url, "d")]
    letters = [a for raw in tally.kept for a in addresses(raw, public_url, "l")]
    if len(pages) != 1 or len(letters) != 1:
        raise Failed(f"want one download page and one letter, found {pages} and {letters}")
    async with (
        aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http,
        http.get(pages[0]) as response,
    ):
        html = await response.text()
    path = re.escape(pages[0].removeprefix(public_url))
    files = re.findall(rf'href="({path}/f/[^"]+)"', html)
    if response.status != 200 or len(files) != 1:
        raise Failed(f"GET {pages[0]}: HTTP {response.status}, file links {files}")
    file_target = Target("file", public_url + files[0], size)
    return [
        Target("download page", pages[0]),
        file_target,
        Target("letter page", letters[0]),
        file_target,
    ]


async def visits_journaled(db_url: str) -> dict[str, int]:
    """How many of each visit event the journal holds."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.ext.asyncio import create_async_engine

    query = text("SELECT type, count(*) FROM events WHERE type IN :types GROUP BY type")
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                query.bindparams(bindparam("types", expanding=True)), {"types": list(VISITS)}
            )
            found = {str(kind): int(count) for kind, count in rows}
    finally:
        await engine.dispose()
    return {kind: found.get(kind, 0) for kind in VISITS}


async def one_turn(
    args: argparse.Namespace, smtp_port: int, pids: list[int], tally: Tally, web: list[Target]
) -> Turn:
    """The mail once, with the web load beside it when `web` names targets."""
    load_average = round(os.getloadavg()[0], 2)
    clients = await open_sessions(args.sessions, smtp_port)
    await cpu_until_idle(pids)  # the logins' hashing is not the mail's
    load = WebLoad(web, args.web_rps) if web else None
    if load is not None:
        await load.start()
        await asyncio.sleep(WARM_UP)
    cpu_before = cpu_seconds(pids)
    try:
        results = await send_all(clients, args.messages, args.size, secrets.token_hex(4), args.rate)
        tally.wanted = set(results.accepted)
        tally.done.clear()
        tally.check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), args.timeout)
    finally:
        outcome = await load.stop() if load is not None else None
    cpu = await cpu_until_idle(pids) - cpu_before
    end = tally.complete_at()
    return Turn(
        web=load is not None,
        accepted=len(results.accepted),
        refused=len(results.refused),
        lost=len(tally.wanted - tally.copies.keys()),
        accept_seconds=results.last_250 - results.first_send,
        deliver_seconds=(end if end is not None else float("nan")) - results.first_send,
        cpu_seconds=cpu,
        load_average=load_average,
        latencies=results.latencies,
        outcome=outcome,
    )


async def measure_mixed(
    args: argparse.Namespace,
    relay: asyncio.subprocess.Process,
    ports: tuple[int, int],
    log: Path,
    tally: Tally,
    sink_pid: int,
    db_url: str,
) -> int:
    smtp_port, web_port = ports
    public_url = f"http://127.0.0.1:{web_port}"
    await wait_ready(relay, web_port, log)
    pids = await relay_pids(relay.pid, args.processes, smtp_port)
    try:
        targets = await seed(smtp_port, public_url, tally, args.web_file_kib, args.timeout)
        before = await visits_journaled(db_url)
        turns = []
        for number in range(args.turns):
            turn = await one_turn(args, smtp_port, pids, tally, targets if number % 2 else [])
            print_turn(number + 1, turn, args)
            turns.append(turn)
        await asyncio.sleep(1)  # the last answers' events are committed after the response
        after = await visits_journaled(db_url)
    except (Failed, aiosmtplib.SMTPException) as exc:
        print(f"FAILED: {exc}")
        return 1
    journaled = {kind: after[kind] - before[kind] for kind in VISITS}
    figures = summary(args, turns, journaled)
    print_summary(figures)
    if args.json:
        print(json.dumps(figures))
    return 1 if figures["problems"] else 0


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary(
    args: argparse.Namespace, turns: list[Turn], journaled: dict[str, int]
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "backend": args.backend,
        "processes": args.processes,
        "prefill": args.prefill,
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "rate": args.rate,
        "web_rps": args.web_rps,
        "web_file_kib": args.web_file_kib,
        "turns": len(turns),
        "load_averages": [t.load_average for t in turns],
        "journaled": journaled,
    }
    problems: list[str] = []
    for label, web in (("mail_only", False), ("mixed", True)):
        done = [t for t in turns if t.web == web]
        if not done:
            continue
        latencies = [x for t in done for x in t.latencies]
        accepted = sum(t.accepted for t in done)
        figures[label] = {
            "p50_ms": ms(percentile(latencies, 0.5)),
            "p99_ms": ms(percentile(latencies, 0.99)),
            "accepted_per_s": round(accepted / sum(t.accept_seconds for t in done), 1),
            "delivered_per_s": round(accepted / sum(t.deliver_seconds for t in done), 1),
            "cpu_ms_per_message": round(sum(t.cpu_seconds for t in done) * 1000 / accepted, 2),
        }
        problems += [f"{t.refused} refused, {t.lost} lost" for t in done if t.refused or t.lost]
    outcomes = [t.outcome for t in turns if t.outcome is not None]
    if outcomes:
        kinds = sorted({kind for o in outcomes for kind in o.latencies})
        every = [x for o in outcomes for times in o.latencies.values() for x in times]
        sent = sum(o.sent for o in outcomes)
        errors = [e for o in outcomes for e in o.errors]
        web = {
            "requests": sent,
            "per_s": round(sent / sum(o.seconds for o in outcomes), 1),
            "errors": len(errors),
            "first_errors": errors[:3],
            "late_max_ms": ms(max(o.late_max for o in outcomes)),
            "p50_ms": ms(percentile(every, 0.5)),
            "p99_ms": ms(percentile(every, 0.99)),
            "client_cpu_s": round(sum(o.cpu_seconds for o in outcomes), 1),
            "kinds": {
                kind: {
                    "answered": len(
                        times := [x for o in outcomes for x in o.latencies.get(kind, [])]
                    ),
                    "p50_ms": ms(percentile(times, 0.5)),
                    "p99_ms": ms(percentile(times, 0.99)),
                }
                for kind in kinds
            },
        }
        figures["web"] = web
        if "mail_only" in figures:
            extra = (
                figures["mixed"]["cpu_ms_per_message"] - figures["mail_only"]["cpu_ms_per_message"]
            )
            mixed_messages = sum(t.accepted for t in turns if t.web)
            web["relay_cpu_ms_per_request"] = round(extra * mixed_messages / max(1, sent), 2)
        problems += journal_problems(outcomes, journaled)
        if errors:
            problems.append(f"{len(errors)} web requests failed: {errors[:3]}")
    figures["problems"] = problems
    return figures


def journal_problems(outcomes: list[Outcome], journaled: dict[str, int]) -> list[str]:
    """Every answered visit is in the journal; a request the client gave up on (timed out)
    may be too, since the relay journals a visit before it answers. So per kind: answered
    <= journaled <= asked for."""
    asked: dict[str, int] = {}
    for outcome in outcomes:
        for kind, count in outcome.asked.items():
            asked[kind] = asked.get(kind, 0) + count
    answered = {kind: sum(len(o.latencies.get(kind, [])) for o in outcomes) for kind in asked}
    events = {
        "download page": journaled["link.viewed"],
        "letter page": journaled["letter.viewed"],
        "file": journaled["download.first"] + journaled["download.repeat"],
    }
    return [
        f"{kind}: {events[kind]} journaled, {answered[kind]} answered of {asked[kind]}"
        for kind in asked
        if not answered[kind] <= events[kind] <= asked[kind]
    ]


def print_turn(number: int, turn: Turn, args: argparse.Namespace) -> None:
    web = f"with {args.web_rps:g} req/s on the web" if turn.web else "mail only"
    line = (
        f"  turn {number} {web:28} load {turn.load_average}: {turn.accepted} accepted,"
        f" time to 250 p50 {ms(percentile(turn.latencies, 0.5))} ms"
        f" p99 {ms(percentile(turn.latencies, 0.99))} ms,"
        f" {turn.accepted / turn.deliver_seconds:.1f} msg/s delivered,"
        f" CPU {turn.cpu_seconds * 1000 / max(1, turn.accepted):.2f} ms/msg"
    )
    if turn.outcome is not None:
        times = [x for kind in turn.outcome.latencies.values() for x in kind]
        line += (
            f"; web {turn.outcome.sent} requests, p50 {ms(percentile(times, 0.5))} ms"
            f" p99 {ms(percentile(times, 0.99))} ms, {len(turn.outcome.errors)} errors"
        )
    print(line, flush=True)


def print_summary(f: dict[str, Any]) -> None:
    print(
        f"sealrelay mixed bench: {f['messages']} x {f['size']} B over {f['sessions']} sessions"
        + (f" offered at {f['rate']:g} a second" if f["rate"] else "")
        + f" per turn, {f['turns']} turns ({f['backend']}, {f['processes']} process(es),"
        f" {database_state(f['prefill'])}; load averages {f['load_averages']})"
    )
    for label, name in (("mail_only", "mail only"), ("mixed", "mixed")):
        if label in f:
            m = f[label]
            print(
                f"  {name:10} time to 250 p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms;"
                f" {m['accepted_per_s']} msg/s accepted, {m['delivered_per_s']} delivered;"
                f" CPU {m['cpu_ms_per_message']} ms/msg"
            )
    if web := f.get("web"):
        print(
            f"  web        {web['requests']} requests at {web['per_s']} req/s"
            f" (asked {f['web_rps']:g}; started at most {web['late_max_ms']} ms late),"
            f" p50 {web['p50_ms']} ms, p99 {web['p99_ms']} ms, errors {web['errors']}"
            + (
                f"; relay CPU {web['relay_cpu_ms_per_request']} ms/request (mixed - mail only)"
                if "relay_cpu_ms_per_request" in web
                else ""
            )
        )
        for kind, k in web["kinds"].items():
            print(
                f"    {kind:14} {k['answered']} answered,"
                f" p50 {k['p50_ms']} ms, p99 {k['p99_ms']} ms"
            )
        print(f"  journal    {f['journaled']}")
    for problem in f["problems"]:
        print(f"  PROBLEM    {problem}")
