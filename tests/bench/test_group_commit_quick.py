"""bench/group_commit.py at small counts, on both backends: it runs end to end and prints each
figure (a smoke test, not a speed test); bad arguments are refused."""

from __future__ import annotations

import re

import pytest

from tests.bench.support import NUMBER, run_bench


async def test_the_group_commit_bench_prints_each_figure_for_each_backend() -> None:
    status, text = await run_bench(
        "group_commit.py",
        "--backends",
        "sqlite,postgres",
        "--transactions",
        "40",
        "--groups",
        "1,4",
        timeout=120,
    )
    assert status == 0, text
    figure = rf"{NUMBER} us CPU +{NUMBER} us wall"
    for backend in ("sqlite", "postgres"):
        block = text.split(f"{backend}:\n", 1)[1]
        assert re.search(rf"^  loop turn +{figure}$", block, re.MULTILINE), text
        assert re.search(rf"^  transaction +{figure}$", block, re.MULTILINE), text
        for size in (1, 4):
            assert re.search(
                rf"^ +{size} units at once +{figure} per unit$", block, re.MULTILINE
            ), text


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--backends", "oracle"], "--backends: unknown oracle"),
        (["--transactions", "0"], "--transactions: at least 1"),
        (["--groups", "1,x"], "--groups: whole numbers"),
        (["--groups", "0"], "--groups: each at least 1"),
    ],
)
async def test_the_group_commit_bench_refuses_bad_arguments(
    args: list[str], complaint: str
) -> None:
    status, text = await run_bench("group_commit.py", *args, timeout=60)
    assert status == 2, text
    assert complaint in text, text
