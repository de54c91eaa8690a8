"""bench/compare.py --quick: the comparison runs end to end and prints every figure.

It is a smoke test, not a speed test: it starts smtp-sink, a private Postfix, a second one
signing with OpenDKIM, a sealrelay on SQLite, bench/forwarder.py and nginx, drives each with
smtp-source, its own paced clients and parallel downloads, and checks that each figure came
out as a number. Missing smtp-source, Postfix, OpenDKIM or nginx makes it fail, not skip."""

from __future__ import annotations

import re

import pytest

from tests.bench.support import NUMBER, run_bench
from tests.opendkim_core import opendkim_command
from tests.postfix_instance import postfix_command

pytestmark = pytest.mark.slow


def one_line(out: str, pattern: str) -> str:
    found = re.findall(pattern, out, re.MULTILINE)
    assert len(found) == 1, f"want one line matching {pattern!r}:\n{out}"
    return str(found[0])


async def test_the_quick_comparison_prints_each_figure() -> None:
    for tool in ("smtp-sink", "smtp-source", "postfix"):
        postfix_command(tool)  # a missing Postfix fails here, saying how to install it
    opendkim_command()
    status, out = await run_bench(
        "compare.py",
        "--quick",
        "--forwarder",
        "--postfix-dkim",
        "--workloads",
        "small,big,dl,paced",
        timeout=600,
    )
    assert status == 0, out
    assert "each sealrelay database holding 40 delivered messages first" in out, out
    mail = (
        rf"{NUMBER} msg/s delivered, {NUMBER} MB/s, (?:time to 250 .*, )?CPU {NUMBER} ms/msg"
        rf"(?: \({NUMBER} of it PostgreSQL\))?, load CPU {NUMBER} ms/msg,"
        rf" peak RSS {NUMBER} MiB \(PSS {NUMBER} MiB\)$"
    )
    latency = rf"time to 250 p50 {NUMBER} ms p99 {NUMBER} ms \([1-9][0-9]* probes\)"
    for server in ("postfix", "postfix-opendkim", "sealrelay-sqlite", "aiosmtpd-forwarder"):
        small = one_line(out, rf"^  round 1 small {server} +(.*)$")
        assert re.fullmatch(mail, small) and re.search(latency, small), small
        big = one_line(out, rf"^  round 1 big   {server} +(.*)$")
        assert re.fullmatch(mail, big), big
        paced = one_line(out, rf"^  round 1 paced {server} +(.*)$")
        every = rf"time to 250 p50 {NUMBER} ms p99 {NUMBER} ms \(every message\)"
        body, late = paced.rsplit(", ", 1)
        assert re.fullmatch(mail, body) and re.search(every, body), paced
        assert re.fullmatch(r"[0-9]+ started late", late), paced
    for server in ("nginx", "sealrelay-sqlite"):
        download = one_line(out, rf"^  round 1 dl    {server} +(.*)$")
        assert re.fullmatch(
            rf"{NUMBER} MiB/s \(2 x 5 MiB\), server CPU {NUMBER} s,"
            rf" peak RSS {NUMBER} MiB \(PSS {NUMBER} MiB\)",
            download,
        ), download
    ratios = re.findall(
        rf"^  ratio sealrelay-sqlite / ([a-z-]+): throughput {NUMBER}x", out, re.MULTILINE
    )
    assert ratios == ["postfix", "postfix-opendkim"] * 2 + ["nginx"], out
    ceiling = rf"^  ratio aiosmtpd-forwarder / (postfix|postfix-opendkim): throughput {NUMBER}x"
    assert len(re.findall(ceiling, out, re.MULTILINE)) == 4, out
    paced_ratios = re.findall(
        rf"^  ratio ([a-z-]+) / ([a-z-]+): time to 250 p99 {NUMBER} ms against {NUMBER} ms,",
        out,
        re.MULTILINE,
    )
    assert len(paced_ratios) == 4, out
    # Postfix's CPU over the quick run's few messages may stay under one clock tick
    cpu = rf"CPU per message(?: {NUMBER}x|: not measured \(Postfix's CPU was under a clock tick\))$"
    assert len(re.findall(cpu, out, re.MULTILINE)) == 12, out


def test_a_missing_tool_is_named_with_its_package() -> None:
    from bench.compare import Missing, tool

    with pytest.raises(Missing, match=r"^no-such-server is missing: apt-get install -y nginx "):
        tool("no-such-server", "nginx")


def test_an_unknown_backend_or_workload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.compare import parse

    for argv, wrong in (
        (["--backends", "sqlite,mysql"], "--backends: unknown mysql"),
        (["--workloads", "small,huge"], "--workloads: unknown huge"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse(argv)
        assert exited.value.code == 2
        assert wrong in capsys.readouterr().err
    for rate in ("0", "-5", "nan"):
        with pytest.raises(SystemExit) as exited:
            parse(["--workloads", "paced", "--rate", rate])
        assert exited.value.code == 2
        assert "--rate: more than 0 messages a second" in capsys.readouterr().err
    assert parse(["--workloads", "paced", "--rate", "450"]).rate == 450
    quick = parse(["--quick"])
    assert (quick.rounds, quick.backends, quick.messages) == (1, ["sqlite"], 40)
    assert parse([]).backends == ["sqlite", "postgres"]


def test_a_postfix_run_under_one_clock_tick_gives_no_cpu_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Four 1 MB messages can cost Postfix less than one 10 ms tick: that is no ratio, not a
    division by zero (it ended a CI run once)."""
    from bench.compare import MailRun, summarize_mail

    def run(server: str, cpu: float) -> MailRun:
        return MailRun(server, 4, 0.1, 4_000_000, cpu, 1 << 20, 1 << 20)

    summarize_mail("big", {"postfix": [run("postfix", 0.0)], "sealrelay": [run("s", 0.1)]})
    out = capsys.readouterr().out
    assert "ratio sealrelay / postfix: throughput 1.00x (rounds 1.00)," in out
    assert out.rstrip().endswith(
        "CPU per message: not measured (Postfix's CPU was under a clock tick)"
    )


def test_paced_runs_compare_their_times_to_250(capsys: pytest.CaptureFixture[str]) -> None:
    """Under the same offered load the throughputs are the rate itself: the ratio line
    gives the p99 times to 250 instead, over every message of every round."""
    from bench.compare import MailRun, summarize_mail

    def run(server: str, cpu: float, latencies: list[float], late: int) -> MailRun:
        return MailRun(server, 100, 1.0, 500_000, cpu, 1 << 20, 1 << 20, 0.0, 0.1, latencies, late)

    summarize_mail(
        "paced",
        {
            "postfix": [run("postfix", 0.1, [0.002] * 98 + [0.040] * 2, 0)],
            "sealrelay": [run("s", 0.15, [0.004] * 98 + [0.030] * 2, 3)],
        },
    )
    out = capsys.readouterr().out
    assert "time to 250 p50 4 ms p99 30 ms, 3 started late" in out, out
    assert "ratio sealrelay / postfix: time to 250 p99 30 ms against 40 ms," in out, out
    assert "CPU per message 1.50x" in out, out
    assert "throughput" not in out, out
