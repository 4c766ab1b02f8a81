"""Prometheus metrics of the gateway (one set per process, served at ``/metrics``)."""

from __future__ import annotations

import gc
import time

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("gateway_connections", "Open WebSocket connections.")
SUBSCRIPTIONS = Gauge("gateway_subscriptions", "Active channel subscriptions.")
FRAMES_SENT = Counter(
    "gateway_frames_sent_total", "Frames written to clients.", ["path"]
)  # path: direct (caught-up clients) or queued (lagging clients)
COALESCED = Counter("gateway_coalesced_total", "Updates merged into a lagging client's pending.")
SLOW_DISCONNECTS = Counter(
    "gateway_slow_disconnects_total", "Clients disconnected for falling too far behind."
)
REJECTED = Counter("gateway_rejected_total", "Refused connections or subscriptions.", ["reason"])
SNAPSHOT_LOADS = Counter("gateway_snapshot_loads_total", "Channel snapshots read from Redis.")
UPDATES = Counter("gateway_updates_total", "Updates received from the live channel.")
GAPS = Counter("gateway_sequence_gaps_total", "Sequence gaps that forced a snapshot reload.")
PUBLISH_DELAY = Histogram(
    "gateway_publish_delay_seconds",
    "Publish to fan-out delay, from the update's published_at.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
FAN_OUT = Histogram(
    "gateway_fan_out_seconds",
    "Time to hand one update to every local subscriber.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
GC_PAUSE = Histogram(
    "gateway_gc_pause_seconds",
    "Garbage-collector pauses of the gateway process, by generation.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started[0])


def watch_gc() -> None:
    """Record garbage-collector pauses (a source of delivery latency at scale)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
