"""MIME parsing cost on hostile and huge input: the figures the tests no longer assert.

    .venv/bin/python bench/mime.py
    .venv/bin/python bench/mime.py --repeat 20

tests/mail/test_mime.py checks what the parser answers to these messages; how long it takes
depends on the machine and its load, so it is measured here and printed for a person to
compare against the targets (a refusal in well under a second, linear time on hostile
Content-Type values, a 25 MB message parsed and stripped of its attachment in under
0.5 s). Each case is checked once, untimed, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import statistics
import time
from collections.abc import Callable

from gateway.mail import mime
from gateway.mail.mime import UnsafeMessage
from tests.mail.test_mime import big_message, nested

HOSTILE_CONTENT_TYPES = {
    "5,000 open comments": "multipart/mixed; boundary=b; x=" + "(" * 5000,
    "60,000 semicolons": "multipart/mixed; boundary=b" + ";" * 60_000,
    "20,000 escaped quotes": "multipart/mixed; boundary=b; x=" + '"\\"' * 20_000,
    "20,000 bare names": "multipart/mixed; boundary=b; name*0*=''a" + "; y" * 20_000,
    "999 continuations": "multipart/mixed; boundary=b"
    + "".join(f"; n*{i}*=%41" for i in range(999)),
}


def refused(raw: bytes, sentence: str) -> Callable[[], None]:
    def run() -> None:
        try:
            mime.parse(raw)
        except UnsafeMessage as exc:
            assert sentence in str(exc), exc
            return
        raise AssertionError(f"not refused: {sentence}")

    return run


def timed(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and worst milliseconds over `repeat` runs, after one untimed check run."""
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    args = parser.parse_args()

    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    many = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * 100_000 + b"--b--\r\n"
    cases: dict[str, tuple[Callable[[], object], float]] = {
        "10,000 nested multiparts (refused)": (refused(nested(10_000), "deeper than"), 1000),
        "100,000 parts (refused)": (refused(many, "more than 500 MIME parts"), 1000),
    }
    for label, value in HOSTILE_CONTENT_TYPES.items():
        raw = f"Content-Type: {value}\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n".encode()
        cases[f"Content-Type with {label}"] = (lambda raw=raw: mime.parse(raw), 500)
    big, _ = big_message()
    root = mime.parse(big)
    cases["25 MB: parse + remove_parts"] = (
        lambda: mime.remove_parts(big, mime.parse(big), ["2"]),
        500,
    )
    cases["25 MB: part_facts"] = (lambda: mime.part_facts(big, root), 500)

    print(f"{'case':48} {'median ms':>10} {'worst ms':>10} {'target ms':>10}")
    for label, (run, target) in cases.items():
        median, worst = timed(run, args.repeat)
        flag = "" if worst < target else "  over target"
        print(f"{label:48} {median:10.1f} {worst:10.1f} {target:10.0f}{flag}")


if __name__ == "__main__":
    main()
