"""DKIM signing cost: gateway.mail.dkim (cryptography) against dkimpy's pure-Python dkim.sign.

    .venv/bin/python bench/dkim.py
    .venv/bin/python bench/dkim.py --small 2000 --large 20

Both sign rsa-sha256 2048, relaxed/relaxed, the same header set with the same oversigning.
Each signature is checked once with dkimpy before timing, so a fast wrong signer cannot win.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and `import dkim` would
# import this file instead of dkimpy.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import base64  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from gateway.mail import dkim as signer  # noqa: E402

DOMAIN = "broker.example"
SELECTOR = "s2026"

HEADERS = (
    b"From: Anna Agent <anna@broker.example>\r\n"
    b"To: Paul Prospect <paul@example.org>\r\n"
    b"Subject: =?utf-8?q?Expos=C3=A9_Hauptstra=C3=9Fe_5?=\r\n"
    b"Date: Tue, 03 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <20261103100000.abc123@broker.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
)


def make_message(size: int) -> bytes:
    """A text part and, for the rest of the size, a base64 attachment, as big mail is."""
    rng = random.Random(size)
    text = (
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + b"Guten Tag Herr Prospect,  anbei das Expos\xc3\xa9 zur Wohnung.\t\r\n" * 40
    )
    if size <= len(HEADERS) + len(text) + 64:
        return HEADERS + text + b"--b1--\r\n"
    attachment_bytes = (size - len(HEADERS) - len(text) - 200) * 3 // 4
    encoded = base64.encodebytes(rng.randbytes(attachment_bytes)).replace(b"\n", b"\r\n")
    attachment = (
        b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded
    )
    return HEADERS + text + attachment + b"--b1--\r\n"


def per_call_ms(fn: Callable[[], bytes], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=500, help="repeats for the 5 KB message")
    parser.add_argument("--large", type=int, default=10, help="repeats for the 10 MB message")
    args = parser.parse_args()

    key = signer.DkimKey(DOMAIN, SELECTOR, signer.generate_private_key(2048))
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    txt = signer.public_txt_value(key).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt

    print(f"rsa-sha256 2048, relaxed/relaxed, Python {sys.version.split()[0]}")
    print(f"{'message':>10} {'gateway.mail.dkim':>14} {'dkimpy':>12} {'speed-up':>9}")
    for label, size, repeat in (("5 KB", 5_000, args.small), ("10 MB", 10_000_000, args.large)):
        message = make_message(size)

        def ours(message: bytes = message) -> bytes:
            return signer.sign(message, key)

        h_tag = re.search(rb"h=([^;]*);", re.sub(rb"\r\n\s", b"", ours()))
        assert h_tag is not None
        names = h_tag.group(1).split(b":")

        def theirs(message: bytes = message, names: list[bytes] = names) -> bytes:
            return bytes(
                dkim.sign(
                    message,
                    SELECTOR.encode(),
                    DOMAIN.encode(),
                    pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=names,
                )
            )

        for fn in (ours, theirs):
            if not dkim.verify(fn() + message, dnsfunc=dnsfunc):
                raise SystemExit(f"{fn.__name__}: signature over the {label} message is invalid")
        ours_ms = per_call_ms(ours, repeat)
        theirs_ms = per_call_ms(theirs, max(3, repeat // 5))
        print(f"{label:>10} {ours_ms:>11.2f} ms {theirs_ms:>9.2f} ms {theirs_ms / ours_ms:>8.1f}x")


if __name__ == "__main__":
    main()
