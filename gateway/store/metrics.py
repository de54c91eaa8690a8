"""Prometheus metrics, served by the web server at /metrics."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import Counter, Gauge, Info

BUILD = Info("sealrelay_build", "The running release")
BUILD.info({"version": metadata.version("sealrelay")})

SMTP_REPLIES = Counter(
    "sealrelay_smtp_replies_total", "Final SMTP replies given to clients, by code", ["code"]
)
DELIVERY_OUTCOMES = Counter(
    "sealrelay_delivery_outcomes_total",
    "Outcomes of delivery attempts per recipient copy",
    ["outcome"],
)
JOURNAL_UNCHAINED = Gauge(
    "sealrelay_journal_unchained_events", "Journal events written but not chained yet"
)
JOURNAL_LAG = Gauge(
    "sealrelay_journal_chain_lag_seconds",
    "How long the oldest journal event not chained yet has waited (0: none waits)",
)
QUEUE_DEPTH = Gauge("sealrelay_queue_deliveries", "Deliveries in the queue, by status", ["status"])
AUTH_CHECKS_WAITING = Gauge(
    "sealrelay_auth_checks_waiting", "SMTP logins waiting for the password hasher"
)
BLOB_STORE_AVAILABLE = Gauge(
    "sealrelay_blob_store_available",
    "1 while the blob store answers, 0 while the relay is degraded without it",
)
