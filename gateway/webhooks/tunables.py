"""Every number that shapes webhook delivery, in one place, so docs/webhooks.md can name them.

They are constants, not settings: the schedule is the Standard Webhooks one that receivers
expect, and none of them is something a brokerage's IT should have to weigh. The worker and
the desk take them as defaults (tests pass their own); change one here and its doc line.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

# Waits between attempts, in seconds (each stretched by up to a quarter of jitter): 5 s,
# 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h; after the last, the delivery fails.
SCHEDULE: Final = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
# One post, name lookup to the end of the answer's first bytes.
TIMEOUT: Final = 15.0
# A claimed delivery is the worker's for this long; it covers one attempt, so no heartbeat.
LEASE: Final = timedelta(seconds=60)
# The longest wait a receiver's `Retry-After` (on 429 or 503) may ask for.
RETRY_AFTER_CAP: Final = 86400.0
# An endpoint that accepted nothing for this long is disabled and the admins are told.
FAILING_LIMIT: Final = timedelta(days=3)
# Posts under way at once per worker; one endpoint gets at most three quarters of them.
CONCURRENCY: Final = 16
# How much of an error text a delivery keeps.
ERROR_LIMIT: Final = 500
# After a secret rotation the previous secret signs beside the new one this long.
ROTATION_GRACE: Final = timedelta(hours=24)
# The most events one replay of a time range queues; a larger range is refused.
REPLAY_LIMIT: Final = 10_000
# The longest endpoint description.
DESCRIPTION_LIMIT: Final = 500
# Delivered and failed deliveries are deleted this long after their last attempt; the events
# stay in the journal, so a replay can still send them again.
KEEP_FINISHED: Final = timedelta(days=30)
# Rows one pruning transaction deletes, so the sweep never holds the writer for long.
PRUNE_BATCH: Final = 5_000
