"""Decode+validate throughput of the stream contract v1 decoder, beside bare ``orjson.loads``.

Run: ``python -m benchmarks.decode_bench [--count N] [--repeat R]``. One core, one
thread. Each mix is timed as the best of R passes over the same N entries; the reference
is ``orjson.loads`` over the very same payload bytes in the same run (parse only, no
validation, no sentinel decoding). Targets: ≥ 250k records/s and ≥ 0.4 of the bare parse.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable

import orjson

from benchmarks.common import make_entries, print_table
from processor.core.contract import decode_entry
from processor.core.records import Record

TARGET_RATE = 250_000
TARGET_RATIO = 0.4


def best_rates(
    work: Callable[[], None], reference: Callable[[], None], count: int, repeat: int
) -> tuple[float, float]:
    """Records/s of the fastest of ``repeat`` runs of each, the two runs interleaved.

    Interleaving makes both figures see the same machine load (other processes).
    """
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, run in enumerate((work, reference)):
            gc.collect()
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return count / best[0], count / best[1]


def measure(mix: str, count: int, repeat: int, *, sentinels: bool) -> list[object]:
    """One table row: decoder rate, bare-parse rate, their ratio and the verdict."""
    entries = make_entries(count, sentinels=sentinels)
    payloads = [e[b"payload"] for e in entries]
    ids = [f"{1717243200000 + i}-0" for i in range(count)]
    results = [decode_entry(i, e) for i, e in zip(ids, entries, strict=True)]
    assert all(type(r) is Record for r in results), "benchmark entries must all be valid"

    def decode_all() -> None:
        for stream_id, entry in zip(ids, entries, strict=True):
            decode_entry(stream_id, entry)

    def parse_all() -> None:
        for payload in payloads:
            orjson.loads(payload)

    rate, bare = best_rates(decode_all, parse_all, count, repeat)
    ratio = rate / bare
    verdict = "ok" if rate >= TARGET_RATE and ratio >= TARGET_RATIO else "MISSED"
    size = sum(map(len, payloads)) // count
    return [mix, size, rate, f"{1e6 / rate:.2f}", bare, f"{ratio:.3f}", verdict]


def main() -> None:
    """Parse the arguments, time both mixes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="entries per mix")
    parser.add_argument("--repeat", type=int, default=5, help="passes; the best is kept")
    args = parser.parse_args()
    rows = [
        measure("FMB920, 15 plain IO", args.count, args.repeat, sentinels=False),
        measure("+ $bigint + $bytes", args.count, args.repeat, sentinels=True),
    ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"decode+validate, one core, best of {args.repeat} x {args.count:,} entries")
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (other processes skew both)")
    print_table(
        ["mix", "payload B", "records/s", "µs/record", "orjson.loads/s", "ratio", "verdict"],
        rows,
    )
    print(f"targets: ≥ {TARGET_RATE:,} records/s and ratio ≥ {TARGET_RATIO} of bare orjson.loads")


if __name__ == "__main__":
    main()
