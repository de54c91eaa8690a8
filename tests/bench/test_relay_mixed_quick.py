"""bench/relay.py --web-rps at a small size: mail in turns without and with prospects' page
views and downloads runs end to end on SQLite and PostgreSQL, every visit answered and
journaled (a smoke test, not a speed test: the bench exits 1 when a visit failed, a mail was
lost, or the journal misses an answered visit)."""

from __future__ import annotations

import re

import pytest

from bench.mixed import journal_problems
from bench.web_load import Outcome
from tests.bench.support import NUMBER, run_bench

pytestmark = pytest.mark.slow


async def run_mixed(backend: str) -> tuple[int, str]:
    return await run_bench(
        "relay.py",
        *("--backend", backend, "--messages", "20", "--sessions", "2"),
        *("--web-rps", "10", "--web-file-kib", "16", "--turns", "2"),
        timeout=300,
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_mixed_load_prints_each_figure(backend: str) -> None:
    status, out = await run_mixed(backend)
    assert status == 0, out
    for mode in ("mail only", "mixed"):
        assert re.search(
            rf"^  {mode} +time to 250 p50 {NUMBER} ms, p99 {NUMBER} ms; {NUMBER} msg/s accepted,"
            rf" {NUMBER} delivered; CPU {NUMBER} ms/msg$",
            out,
            re.MULTILINE,
        ), out
    web = re.search(
        rf"^  web        ([0-9]+) requests at {NUMBER} req/s \(asked 10; started at most"
        rf" {NUMBER} ms late\), p50 {NUMBER} ms, p99 {NUMBER} ms, errors 0",
        out,
        re.MULTILINE,
    )
    assert web and int(web.group(1)) > 0, out
    for kind in ("download page", "file", "letter page"):
        answered = re.search(rf"^    {kind} +([0-9]+) answered, p50 {NUMBER} ms", out, re.MULTILINE)
        assert answered and int(answered.group(1)) > 0, out
    assert "PROBLEM" not in out


def test_a_visit_answered_but_not_journaled_is_a_problem() -> None:
    outcome = Outcome(
        latencies={"download page": [0.01, 0.02], "file": [0.01], "letter page": [0.03]},
        asked={"download page": 2, "file": 2, "letter page": 1},
    )
    journaled = {"link.viewed": 2, "letter.viewed": 0, "download.first": 1, "download.repeat": 1}
    assert journal_problems([outcome], journaled) == ["letter page: 0 journaled, 1 answered of 1"]
    journaled["letter.viewed"] = 1
    assert journal_problems([outcome], journaled) == []
    journaled["download.repeat"] = 2  # more downloads journaled than were asked for
    assert journal_problems([outcome], journaled) == ["file: 3 journaled, 1 answered of 2"]
