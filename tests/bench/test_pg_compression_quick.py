"""bench/pg_compression.py runs against the test PostgreSQL (it fails, never skips, without
one) and prints a figure for each way of storing the blobs."""

from __future__ import annotations

import re

import pytest

from bench import pg_compression


def test_it_prints_each_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert pg_compression.main(["--rows", "40", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for method in pg_compression.METHODS:
        assert re.search(rf"^  {method} +\d+\.\d{{3}} ms of the server's CPU per row", out, re.M)


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        pg_compression.main(["--rows", "0"])
    assert exited.value.code == 2
    assert "--rows and --rounds: at least 1" in capsys.readouterr().err
