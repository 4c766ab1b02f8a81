"""Prometheus metrics of the throughput pipeline (names are documented in docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ENTRIES_READ = Counter("processor_entries_read_total", "Stream entries read", ["phase"])
RECORDS_WRITTEN = Counter("processor_records_written_total", "Positions newly stored")
WRITE_PATH = Counter(
    "processor_write_path_records_total",
    "Records written straight into positions (direct) or through staging + ON CONFLICT",
    ["path"],
)
WRITE_FALLBACKS = Counter(
    "processor_write_fallbacks_total",
    "Direct writes refused (a key already stored) and redone through staging",
)
DUPLICATES = Counter("processor_duplicates_total", "Records already stored (resent or redelivered)")
DEAD_LETTERS = Counter(
    "processor_dead_letters_total", "Entries sent to the dead-letter stream", ["reason"]
)
BATCH_SIZE = Histogram(
    "processor_batch_size",
    "Entries per written batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
BATCH_SECONDS = Histogram(
    "processor_batch_write_seconds",
    "Time to store one batch (commit included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAG_SECONDS = Histogram(
    "processor_lag_seconds",
    "Commit time minus ingestion time (received_at) of stored records",
    buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
LAST_LAG = Gauge("processor_last_lag_seconds", "Lag of the newest committed batch")
PENDING = Gauge("processor_pending_entries", "Entries delivered to the group, not acknowledged")
STREAM_LAG = Gauge("processor_stream_lag_entries", "Entries not yet delivered to the group")
STATE_SIZE = Gauge("processor_device_state_size", "Devices held in the per-device state LRU")
STATE_EVICTIONS = Gauge(
    "processor_device_state_evictions", "Devices evicted from the state LRU since start"
)
QUEUE_BATCHES = Gauge("processor_queue_batches", "Batches waiting for the writer")
RETRIES = Counter(
    "processor_retries_total", "Transient failures retried, by dependency", ["dependency"]
)
HOOK_ERRORS = Counter(
    "processor_commit_hook_errors_total", "Failures of post-commit work (domain, live)", ["hook"]
)
UP = Gauge("processor_dependency_up", "1 when the dependency answered last time", ["dependency"])
