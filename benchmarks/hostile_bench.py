"""Decode cost of each kind of hostile entry, beside valid entries in the same run.

Run: ``python -m benchmarks.hostile_bench [--count N] [--repeat R]``. One core. For each
kind of tests/faults/hostile.py, N entries are decoded (best of R passes) and the cost
per entry is printed with its size, next to valid entries decoded in the same run. The
question it answers: can an attacker make the processor spend much more per entry than
real traffic costs (an amplification)? Costs should follow size (ns/byte no worse than
a valid entry's), and the entry size limit then bounds every kind.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

from tests.faults.hostile import INJECTIONS, MAKERS, Fields, valid_entry

from processor.core.contract import decode_entry


def best_us(entries: list[Fields], repeat: int) -> float:
    """Microseconds per entry of the fastest of ``repeat`` decoding passes."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        for index, fields in enumerate(entries):
            decode_entry(f"1-{index}", fields)
        best = min(best, time.perf_counter() - started)
    return best / len(entries) * 1e6


def size(entries: list[Fields]) -> int:
    return sum(len(k) + len(v) for e in entries for k, v in e.items()) // len(entries)


def main() -> None:
    """Time every kind and the valid reference; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="entries per kind")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is kept")
    args = parser.parse_args()
    rng = random.Random(1)
    valid = [valid_entry(rng, i % 200, i) for i in range(args.count)]
    reference = best_us(valid, args.repeat)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"decode cost per entry, one core, best of {args.repeat} x {args.count} entries")
    print(f"machine: {os.cpu_count()} CPUs, load average {load}")
    print(f"{'kind':28} {'bytes':>8} {'µs/entry':>9} {'x valid':>8} {'ns/byte':>8}")
    per_byte = reference * 1000 / size(valid)
    print(f"{'valid (reference)':28} {size(valid):8} {reference:9.2f} {1.0:8.2f} {per_byte:8.2f}")
    worst = ("", 0.0)
    for kind, make in MAKERS.items():
        entries = [make(rng, i, rng.choice(INJECTIONS)) for i in range(args.count)]
        cost = best_us(entries, args.repeat)
        worst = max(worst, (kind, cost), key=lambda item: item[1])
        nbytes = size(entries)
        ratio, per_byte = cost / reference, cost * 1000 / nbytes
        print(f"{kind:28} {nbytes:8} {cost:9.2f} {ratio:8.2f} {per_byte:8.2f}")
    print(f"worst: {worst[0]} at {worst[1]:.2f} µs/entry = {worst[1] / reference:.1f}x a valid one")


if __name__ == "__main__":
    main()
