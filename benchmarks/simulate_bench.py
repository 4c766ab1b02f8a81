"""Simulator throughput into Redis in ``--rate max`` mode, beside bare pipelined XADD.

Run: ``python -m benchmarks.simulate_bench [--vehicles N] [--seconds S] [--batch-size B]``
against the Redis of ``PROCESSOR_REDIS_URL`` (default 127.0.0.1:6379). One process, one
thread, as ``processor simulate --rate max`` runs.

Figures from the same run, on the same entries:

1. generate only: the simulator producing entries, no I/O;
2. simulate → Redis: :func:`processor.tools.simulate.run` into a :class:`RedisSink`
   (what ``processor simulate --rate max`` does), the measured figure;
3. bare XADD: the very same entries, prebuilt and packed, pipelined into a fresh stream
   with the same batch size the way the sink does it (one round trip per batch): the
   ceiling of the write path on this client and server, the reference;
4. the same entries through redis-py's ``pipeline().xadd()``, for comparison.

Wall time is what the target is about; CPU time of this process is printed beside it
because on a shared host the wall figures move with the load (printed too).

Target: simulate → Redis ≥ 20,000 records/s.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import uuid

import redis

from benchmarks.common import print_table
from processor.tools.simulate import (
    Entry,
    FaultRates,
    RedisSink,
    SimConfig,
    Simulation,
    pack_xadds,
    run,
    xadd_head,
)

TARGET = 20_000
START_MS = 1_780_300_800_000  # 2026-06-01T08:00:00Z


def simulation(vehicles: int) -> Simulation:
    """A field that is all on the stage within a minute: the load shape of a big event."""
    return Simulation(
        SimConfig(
            start_ms=START_MS,
            seed=1,
            vehicles=vehicles,
            length_km=20,
            start_interval_ms=max(10, 60_000 // vehicles),
            rates=FaultRates(),
        )
    )


class Timer:
    """Wall and CPU seconds of this process over a block (CPU shows a contended host)."""

    def __enter__(self) -> Timer:
        gc.collect()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def generate_only(vehicles: int, until_ms: int) -> tuple[list[Entry], Timer]:
    """All entries up to ``until_ms`` and the time it took to produce them."""
    sim = simulation(vehicles)
    with Timer() as timer:
        entries = [e for _, batch in sim.batches(until_ms) for e in batch]
    return entries, timer


def simulate_into_redis(
    client: redis.Redis, stream: str, vehicles: int, until_ms: int, batch: int
) -> tuple[int, Timer]:
    """Entries written and time taken by the simulator writing into ``stream``."""
    sim = simulation(vehicles)
    sink = RedisSink(client, stream, batch_size=batch)
    with Timer() as timer:
        summary = run(sim, [sink], speed=None, until_ms=until_ms)
    return summary.entries, timer


def bare_xadd(client: redis.Redis, stream: str, entries: list[Entry], batch: int) -> Timer:
    """Time to pipeline XADD the prebuilt ``entries`` (packed up front), ``batch`` a trip."""
    batches = [entries[lo : lo + batch] for lo in range(0, len(entries), batch)]
    packed = [(pack_xadds(xadd_head(stream), b), len(b)) for b in batches]
    conn = client.connection_pool.get_connection()
    try:
        with Timer() as timer:
            for command, count in packed:
                conn.send_packed_command([command])
                for _ in range(count):
                    conn.read_response()
    finally:
        client.connection_pool.release(conn)
    return timer


def redis_py_xadd(client: redis.Redis, stream: str, entries: list[Entry], batch: int) -> Timer:
    """Time to pipeline XADD the prebuilt ``entries`` through redis-py's pipeline."""
    fields = [e.fields() for e in entries]
    with Timer() as timer:
        for lo in range(0, len(fields), batch):
            pipe = client.pipeline(transaction=False)
            for f in fields[lo : lo + batch]:
                pipe.xadd(stream, f)  # type: ignore[arg-type]
            pipe.execute()
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=1_000)
    parser.add_argument("--seconds", type=int, default=300, help="simulated seconds")
    parser.add_argument("--batch-size", type=int, default=1_000)
    args = parser.parse_args()
    url = os.environ.get("PROCESSOR_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url)
    prefix = f"bench:simulate:{uuid.uuid4().hex[:8]}"
    until_ms = START_MS + args.seconds * 1000
    streams = [f"{prefix}:{name}" for name in ("sim", "bare", "pipe")]
    try:
        entries, gen = generate_only(args.vehicles, until_ms)
        written, sim = simulate_into_redis(
            client, streams[0], args.vehicles, until_ms, args.batch_size
        )
        assert written == len(entries) == client.xlen(streams[0])
        bare = bare_xadd(client, streams[1], entries, args.batch_size)
        pipe = redis_py_xadd(client, streams[2], entries, args.batch_size)
    finally:
        client.delete(*streams)
        client.close()
    n = len(entries)
    print(
        f"{args.vehicles:,} vehicles, {args.seconds} simulated s, {n:,} entries, "
        f"batch {args.batch_size:,}, Redis {url.rsplit('@', 1)[-1]}"
    )
    print_table(
        ["path", "wall s", "records/s", "cpu s", "records/cpu-s"],
        [
            row("generate only (no I/O)", n, gen),
            row("simulate -> Redis (--rate max)", n, sim),
            row("bare pipelined XADD, prebuilt (ref)", n, bare),
            row("redis-py pipeline().xadd(), prebuilt", n, pipe),
        ],
    )
    rate = n / sim.wall
    verdict = "PASS" if rate >= TARGET else "BELOW TARGET"
    print(
        f"simulate -> Redis: {rate:,.0f} records/s = {bare.wall / sim.wall:.2f} of bare XADD; "
        f"target >= {TARGET:,} records/s: {verdict}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )


def row(name: str, n: int, timer: Timer) -> list[object]:
    """A table row: wall and CPU seconds and the rates they give for ``n`` records."""
    return [name, timer.wall, n / timer.wall, timer.cpu, n / timer.cpu]


if __name__ == "__main__":
    main()
