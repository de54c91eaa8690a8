"""The relay's log lines (sealrelay/log_lines.py) read as the standard formatter writes them."""

from __future__ import annotations

import logging

from sealrelay.log_lines import SecondStampFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def record(created: float) -> logging.LogRecord:
    line = logging.LogRecord("gateway.x", logging.INFO, __file__, 1, "sent %s", ("a",), None)
    line.created = created
    line.msecs = int((created - int(created)) * 1000) + 0.0
    return line


def test_the_time_is_the_standard_formatter_s_within_a_second_and_across_seconds() -> None:
    ours, standard = SecondStampFormatter(FORMAT), logging.Formatter(FORMAT)
    moments = [1764939231.0, 1764939231.0005, 1764939231.5, 1764939231.999, 1764939232.001,
               1764939231.25, 1767225599.999, 1767225600.0]  # fmt: skip
    for created in moments:
        assert ours.format(record(created)) == standard.format(record(created))
    assert ours.format(record(1764939231.5)).endswith(",500 INFO gateway.x: sent a")


def test_a_date_format_of_its_own_is_the_standard_formatter_s() -> None:
    ours = SecondStampFormatter(FORMAT, datefmt="%H:%M:%S")
    standard = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    assert ours.format(record(1764939231.5)) == standard.format(record(1764939231.5))
