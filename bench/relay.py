"""End-to-end relay benchmark: clients -> `sealrelay serve` -> a counting sink.

    .venv/bin/python bench/relay.py --messages 5000 --size 5000 --sessions 20
    .venv/bin/python bench/relay.py --messages 50 --size 10000000 --sessions 5
    .venv/bin/python bench/relay.py --messages 500 --size 5000 --sessions 10 --backend postgres

The relay runs as a real subprocess with a temporary config (SQLite in a temp directory, or
a fresh PostgreSQL database), plaintext AUTH on loopback and a DKIM key for the sender
domain, so signing is part of the cost. The sink runs in a child process of its own so that
its DATA parsing does not share an event loop with the clients; it counts messages and bytes
and throws the bodies away. It offers PIPELINING and CHUNKING, as Postfix's smtpd does
(`--no-chunking`: DATA only, as Postfix's smtp-sink in bench/compare.py).

Prints accepted and delivered msgs/s, p50/p99 time-to-250, the relay's peak RSS and the loss;
exits 1 if a message was lost (or not accepted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    Results,
    RssSampler,
    Tally,
    add_agent,
    child_environment,
    cpu_seconds,
    cpu_until_idle,
    database_state,
    database_url,
    free_port,
    loop_thread_seconds,
    open_sessions,
    percentile,
    relay_pids,
    reset_peak,
    sealrelay_command,
    send_all,
    sink_process,
    vm_hwm_kib,
    wait_ready,
    write_config,
)
from bench.mixed import measure_mixed  # noqa: E402
from bench.prefill import prefill  # noqa: E402


async def bench(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="sealrelay-bench-"))
    loop = asyncio.get_running_loop()
    tally = Tally()
    smtp_port, web_port, sink_port = free_port(), free_port(), free_port()
    log = directory / "relay.log"
    try:
        async with database_url(args.backend, directory) as db_url:
            if args.prefill:
                await prefill(db_url, args.prefill)
            worker = {
                key: value
                for key, value in (
                    ("concurrency", args.concurrency),
                    ("destination_concurrency", args.destination_concurrency),
                )
                if value is not None
            }
            link_over = f"{args.web_file_kib // 2}KiB" if args.web_rps else None
            config = write_config(
                directory,
                db_url,
                (smtp_port, web_port, sink_port),
                args.size,
                args.links,
                worker,
                link_over,
            )
            await asyncio.to_thread(add_agent, config)
            with (
                sink_process(sink_port, tally, loop, not args.no_chunking) as sink_pid,
                log.open("wb") as out,
            ):
                profile = ("-m", "cProfile", "-o", str(args.profile)) if args.profile else ()
                relay = await asyncio.create_subprocess_exec(
                    *((sys.executable, *profile) if profile else ()),
                    sealrelay_command(),
                    "serve",
                    "--config",
                    str(config),
                    *(("--processes", str(args.processes)) if args.processes > 1 else ()),
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=child_environment(),
                )
                try:
                    if args.web_rps:
                        ports = (smtp_port, web_port)
                        return await measure_mixed(args, relay, ports, log, tally, sink_pid, db_url)
                    return await measure(args, relay, (smtp_port, web_port), log, tally, sink_pid)
                finally:
                    if relay.returncode is None:
                        relay.terminate()
                    try:
                        await asyncio.wait_for(relay.wait(), 15)
                    except TimeoutError:
                        relay.kill()
                        await relay.wait()
    finally:
        if args.keep:
            print(f"kept {directory} (config, relay.log, database, blobs)")
        else:
            shutil.rmtree(directory, ignore_errors=True)


async def measure(
    args: argparse.Namespace,
    relay: asyncio.subprocess.Process,
    ports: tuple[int, int],
    log: Path,
    tally: Tally,
    sink_pid: int,
) -> int:
    smtp_port, web_port = ports
    load_at_start = round(os.getloadavg()[0], 2)
    await wait_ready(relay, web_port, log)
    pids = await relay_pids(relay.pid, args.processes, smtp_port)
    start_rss = sum(psutil.Process(pid).memory_info().rss for pid in pids)
    clients = await open_sessions(args.sessions, smtp_port)
    login_hwm = total_kib(vm_hwm_kib(pid) for pid in pids)
    was_reset = all([reset_peak(pid) for pid in pids])
    sampler = RssSampler(relay.pid)
    sampler.start()
    cpu_before_traffic = cpu_seconds(pids)
    loop_before_traffic = loop_thread_seconds(pids)
    recorder = start_py_spy(args.py_spy, relay.pid)

    results = await send_all(clients, args.messages, args.size, secrets.token_hex(4), args.rate)
    tally.wanted = set(results.accepted)
    tally.check()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.done.wait(), args.timeout)
    await asyncio.sleep(0.5)  # late duplicates, if any, still count
    traffic_cpu = await cpu_until_idle(pids) - cpu_before_traffic
    loop_cpu = loop_thread_seconds(pids) - loop_before_traffic
    stop_py_spy(recorder)
    await sampler.stop()
    traffic_hwm = total_kib(vm_hwm_kib(pid) for pid in pids)
    relay_cpu = cpu_seconds(pids)
    sink_cpu = sum(psutil.Process(sink_pid).cpu_times()[:2])
    own_cpu = sum(os.times()[:2])

    lost = sorted(tally.wanted - tally.copies.keys())
    accept_span = results.last_250 - results.first_send
    deliver_span = (tally.complete_at() or time.perf_counter()) - results.first_send
    figures: dict[str, Any] = {
        "backend": args.backend,
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "rate": args.rate,
        "links": args.links,
        "processes": args.processes,
        "prefill": args.prefill,
        "accepted": len(results.accepted),
        "refused": len(results.refused),
        "delivered": len(tally.wanted & tally.copies.keys()),
        "accept_seconds": round(accept_span, 2),
        "deliver_seconds": round(deliver_span, 2),
        "accepted_per_s": round(len(results.accepted) / accept_span, 1) if accept_span else 0,
        "delivered_per_s": round(len(tally.wanted) / deliver_span, 1) if not lost else 0,
        "p50_ms": round(percentile(results.latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(results.latencies, 0.99) * 1000, 1),
        "rss_start_mib": mib(start_rss // 1024),
        "peak_rss_logins_mib": mib(login_hwm),
        "peak_rss_traffic_mib": mib(traffic_hwm) if was_reset else None,
        "peak_rss_sampled_mib": mib(sampler.peak // 1024),
        "sink_mib": mib(tally.octets // 1024),
        "sink_connections": tally.connections,
        "load_average_at_start": load_at_start,
        "duplicates": sum(n - 1 for n in tally.copies.values()),
        "lost": len(lost),
        "cpu_relay_s": round(relay_cpu, 1),
        "cpu_traffic_s": round(traffic_cpu, 2),
        "cpu_ms_per_message": round(traffic_cpu * 1000 / max(1, len(results.accepted)), 2),
        "cpu_loop_ms_per_message": round(loop_cpu * 1000 / max(1, len(results.accepted)), 2),
        "cpu_sink_s": round(sink_cpu, 1),
        "cpu_clients_s": round(own_cpu, 1),
    }
    print_report(figures, results, lost)
    if args.json:
        print(json.dumps(figures))
    return 1 if lost or results.refused else 0


def start_py_spy(path: Path | None, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy recording the relay during the traffic (logins and start-up left out)."""
    if path is None:
        return None
    command = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "speedscope" if path.suffix == ".json" else "raw"
    # --gil: the thread holding the GIL is sampled, so the shares are of Python's work
    options = [
        "--rate",
        "200",
        "--nonblocking",
        "--threads",
        "--gil",
        "--subprocesses",
        "--format",
        fmt,
    ]
    return subprocess.Popen(
        [command, "record", "--pid", str(pid), *options, "--output", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(recorder: subprocess.Popen[bytes] | None) -> None:
    if recorder is not None:
        recorder.send_signal(2)  # SIGINT: py-spy writes its file and exits
        recorder.wait(30)


def total_kib(values: Iterable[int | None]) -> int | None:
    found = list(values)
    return None if None in found else sum(v for v in found if v is not None)


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def print_report(f: dict[str, Any], results: Results, lost: list[str]) -> None:
    print(
        f"sealrelay bench: {f['messages']} x {f['size']} B over {f['sessions']} sessions"
        + (f" offered at {f['rate']:g} a second" if f["rate"] else "")
        + f" ({f['backend']}, {f['processes']} process(es), links {'on' if f['links'] else 'off'},"
        f" {database_state(f['prefill'])}; load average {f['load_average_at_start']} at start)"
    )
    print(
        f"  accepted      {f['accepted']} in {f['accept_seconds']} s: {f['accepted_per_s']} msg/s"
    )
    print(
        f"  delivered     {f['delivered']} in {f['deliver_seconds']} s:"
        f" {f['delivered_per_s']} msg/s ({f['sink_mib']} MiB at the sink)"
    )
    print(f"  time to 250   p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms")
    print(f"  upstream      {f['sink_connections']} connections to the sink")
    print(
        f"  relay RSS     {f['rss_start_mib']} MiB when ready; peak (VmHWM) through the logins"
        f" {f['peak_rss_logins_mib']} MiB, during the traffic {f['peak_rss_traffic_mib']} MiB;"
        f" sampled every 50 ms: {f['peak_rss_sampled_mib']} MiB"
    )
    print(
        f"  CPU seconds   relay {f['cpu_relay_s']}, sink {f['cpu_sink_s']},"
        f" clients {f['cpu_clients_s']}"
    )
    print(
        f"  CPU/message   {f['cpu_ms_per_message']} ms of relay CPU per message during the"
        f" traffic ({f['cpu_traffic_s']} s from the first MAIL FROM until the relay was idle),"
        f" {f['cpu_loop_ms_per_message']} ms of it on the event loop's thread"
    )
    print(f"  refused       {f['refused']} {list(results.refused.items())[:3]}")
    print(f"  duplicates    {f['duplicates']}")
    print(f"  lost          {f['lost']} {lost[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1000, help="how many messages (N)")
    parser.add_argument("--size", type=int, default=5000, help="bytes per message, about")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (C)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="messages offered a second, the sessions waiting for each one's time"
        " (default: as fast as the relay answers)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="sealrelay serve --processes N; RSS and CPU are summed over the processes",
    )
    parser.add_argument(
        "--links",
        action="store_true",
        help="keep the shipped policy, so large attachments become download links"
        " (default: links off, every message is relayed whole and signed)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="[worker] concurrency (default: shipped)"
    )
    parser.add_argument(
        "--destination-concurrency",
        type=int,
        default=None,
        help="[worker] destination_concurrency (default: shipped); the sink is one destination",
    )
    parser.add_argument(
        "--web-rps",
        type=float,
        default=0,
        help="mixed load (bench/mixed.py): prospects' page views and downloads at this many"
        " requests/s beside the mail, in turns with and without them",
    )
    parser.add_argument(
        "--web-file-kib", type=int, default=100, help="with --web-rps: the linked file, KiB"
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=2,
        help="with --web-rps: mail turns, without and with the web load in alternation",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for delivery")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the relay under cProfile and write its stats to this file",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="record the relay with py-spy during the traffic into this file"
        " (.json: speedscope, otherwise collapsed stacks for bench/stages.py)",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="delivered messages in the database before the relay starts, as in service"
        " (bench/prefill.py; default 0: a new database)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--no-chunking",
        action="store_true",
        help="the sink does not offer CHUNKING (Postfix's smtp-sink, older servers): DATA",
    )
    args = parser.parse_args()
    if args.prefill < 0:
        parser.error("--prefill: at least 0")
    if args.rate is not None and not args.rate > 0:
        parser.error("--rate: more than 0 messages a second")
    sys.exit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
