"""Shared helpers for the benchmark scripts: realistic entries, RSS, percentiles, tables.

Import from a benchmark with ``from benchmarks.common import ...`` and run it from the
repository root as ``python -m benchmarks.<name>``.

- :func:`make_payload` / :func:`make_entry`: a realistic FMB920 record (15 IO elements) in
  the stream contract v1 shape, optionally with one ``$bigint`` and one ``$bytes`` sentinel.
- :func:`make_entries`: many entries for a fleet of devices, deterministic for a seed.
- :func:`rss_mib`: resident memory of this process.
- :func:`percentile`: nearest-rank percentile of a list of numbers.
- :func:`print_table`: a fixed-width table on stdout.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Any

import orjson
import psutil

# IO ids an FMB920 sends in a periodic record, with their element size in bytes (from
# the shared io-elements table): 15 elements, all 1/2/4-byte, so all plain JSON integers.
FMB920_IO: tuple[tuple[int, int], ...] = (
    (239, 1), (240, 1), (80, 1), (21, 1), (200, 1), (69, 1), (113, 1), (1, 1),
    (181, 2), (182, 2), (66, 2), (67, 2), (24, 2),
    (241, 4), (16, 4),
)  # fmt: skip
BIGINT_IO = 78  # iButton id: an 8-byte element, always a $bigint sentinel
BYTES_IO = 256  # VIN: a variable-length (NX) element, always a $bytes sentinel
BASE_TS_MS = 1_717_243_200_000  # 2024-06-01T12:00:00Z


def make_imei(index: int) -> str:
    """A 15-digit IMEI for device number ``index`` (stable across runs)."""
    return f"35630704{index:07d}"


def make_payload(
    rng: random.Random, ts: int, *, sentinels: bool = False, codec: int = 142
) -> dict[str, Any]:
    """One record payload (before JSON encoding) with realistic values."""
    io: dict[str, Any] = {}
    for io_id, size in FMB920_IO:
        io[str(io_id)] = rng.randrange(0, 256**size if size < 4 else 10_000_000)
    if sentinels:
        io[str(BIGINT_IO)] = {"$bigint": str(rng.randrange(2**53, 2**64))}
        io[str(BYTES_IO)] = {
            "$bytes": base64.b64encode(b"WVWZZZ1KZAW%06d" % rng.randrange(10**6)).decode()
        }
    return {
        "codec": codec,
        "ts": ts,
        "received_at": ts + rng.randrange(200, 2_000),
        "priority": 0,
        "lat": round(45.0 + rng.random(), 7),
        "lon": round(15.0 + rng.random(), 7),
        "alt": rng.randrange(-20, 1_500),
        "angle": rng.randrange(0, 360),
        "sat": rng.randrange(4, 20),
        "speed": rng.randrange(0, 180),
        "event_io": 0,
        "generation": None,
        "io": io,
    }


def make_entry(
    rng: random.Random, device: int, ts: int, *, sentinels: bool = False
) -> dict[bytes, bytes]:
    """One stream entry as redis-py returns it: bytes field names to bytes values."""
    payload = make_payload(rng, ts, sentinels=sentinels)
    return {b"v": b"1", b"imei": make_imei(device).encode(), b"payload": orjson.dumps(payload)}


def make_entries(
    count: int, *, devices: int = 1_000, sentinels: bool = False, seed: int = 1
) -> list[dict[bytes, bytes]]:
    """``count`` entries round-robin over ``devices`` trackers at 1 Hz each."""
    rng = random.Random(seed)
    return [
        make_entry(rng, i % devices, BASE_TS_MS + (i // devices) * 1_000, sentinels=sentinels)
        for i in range(count)
    ]


def rss_mib() -> float:
    """Resident set size of this process, in MiB."""
    return float(psutil.Process().memory_info().rss) / 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0–100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers, columns padded to their widest cell."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        padded = [
            c.ljust(w) if i == 0 or n == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(padded))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
