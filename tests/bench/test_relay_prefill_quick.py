"""bench/relay.py --prefill: the relay takes its mail on a database that holds delivered mail
already, as one in service does, and the report's first line says how the database began
(a smoke test, not a speed test: the bench exits 1 when a message was lost)."""

from __future__ import annotations

import pytest

from tests.bench.support import run_bench


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("prefill", "said"),
    [("30", "the database holding 30 delivered messages first"), ("0", "a new database")],
)
async def test_the_relay_bench_runs_on_a_filled_or_a_new_database(
    backend: str, prefill: str, said: str
) -> None:
    status, out = await run_bench(
        "relay.py",
        *("--backend", backend, "--messages", "20", "--sessions", "2", "--prefill", prefill),
        timeout=300,
    )
    assert status == 0, out
    first = out.splitlines()[0]
    assert first.startswith("sealrelay bench: 20 x 5000 B over 2 sessions"), out
    assert f", {said}; load average" in first, out
    assert "\n  lost          0 []\n" in out, out
    assert "\n  duplicates    0\n" in out, out


async def test_a_negative_prefill_is_refused() -> None:
    status, out = await run_bench("relay.py", "--prefill", "-1", timeout=60)
    assert status == 2, out
    assert "--prefill: at least 0" in out, out
