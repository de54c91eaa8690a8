"""bench/pg_commit.py runs against the test PostgreSQL (it fails, never skips, without one)
and prints the server's CPU for each step of the group commit, on a new database and on a
filled one."""

from __future__ import annotations

import re

import pytest

from bench import pg_commit


@pytest.mark.parametrize(
    ("prefill", "said"), [("0", "on a new, unanalyzed database"), ("40", "after 40 analyzed")]
)
def test_it_prints_each_step(prefill: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert pg_commit.main(["--messages", "40", "--rounds", "1", "--prefill", prefill]) == 0
    out = capsys.readouterr().out
    assert said in out
    for step in (*pg_commit.STEPS, "all"):
        assert re.search(rf"^  {step} +\d+\.\d{{3}} ms \d+\.\d{{3}} ms$", out, re.M), out


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        pg_commit.main(["--prefill", "-1"])
    assert exited.value.code == 2
    assert "--prefill: at least 0" in capsys.readouterr().err
