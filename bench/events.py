"""What holding every journal event to its declaration costs: microseconds per event.

A message through the relay journals about four events (message.received, delivery.queued,
delivery.delivered, ...); compare the figure with the relay's per-message time from
bench/relay.py.
"""

from __future__ import annotations

import argparse
import time

from gateway.store import events

SAMPLES = {
    "delivery.queued": events.DELIVERY_QUEUED.new(
        {"recipient": "p@example.com"}, message_id="m" * 32, delivery_id="d" * 32
    ),
    "message.received": events.MESSAGE_RECEIVED.new(
        {
            "sender": "agent@broker.example",
            "recipients": [f"p{i}@example.com" for i in range(5)],
            "size": 5000,
            "subject": "Ihr Exposé: Wohnung mit Balkon",
            "message_id": "<offer-1@broker.example>",
            "user_id": 1,
            "peer": "192.0.2.7",
        },
        message_id="m" * 32,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100_000)
    rounds = parser.parse_args().rounds
    for name, new in SAMPLES.items():
        events.check(new)  # builds the validator once, as the first append does
        start = time.perf_counter()
        for _ in range(rounds):
            events.check(new)
        micros = (time.perf_counter() - start) / rounds * 1e6
        print(f"{name:20} {micros:6.2f} µs per check")


if __name__ == "__main__":
    main()
