"""Soak: a real `processor run` at 2,000 devices × 1 Hz; RSS and lag sampled every minute.

Run from the repository root: ``python -m benchmarks.soak_bench [--minutes 30]``. It makes
its own database and stream and removes them afterwards. Every minute it prints the
processor's RSS, the records stored, the stream backlog and the commit lag quantiles of
that minute (from the processor's own ``processor_lag_seconds`` histogram, so each figure
is the upper bound of its bucket). The targets: memory flat after warm-up, lag p99 < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import psutil
import redis.asyncio as aioredis

from benchmarks.common import make_imei, make_payload
from benchmarks.pipeline_bench import ADMIN_URL, REDIS_URL, _admin, _db_url, prepare_database
from processor.settings import load_settings


def lag_buckets(metrics: str) -> dict[float, float]:
    """Cumulative counts of processor_lag_seconds by upper bound."""
    out: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("processor_lag_seconds_bucket{"):
            bound = line.split('le="')[1].split('"')[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The bucket bound below which ``q`` of the observations between two scrapes fall."""
    deltas = sorted((b, after.get(b, 0.0) - before.get(b, 0.0)) for b in after)
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return float("nan")
    for bound, count in deltas:
        if count >= q * total:
            return bound
    return float("inf")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def stored(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith("processor_records_written_total "):
            return int(float(line.split()[1]))
    return 0


async def produce(stream: str, devices: int, seconds: float, stop: asyncio.Event) -> int:
    """XADD one record per device per second, received_at = now, until time is up."""
    client = aioredis.Redis.from_url(REDIS_URL)
    rng = random.Random(1)
    sent = 0
    started = time.monotonic()
    tick = 0
    while time.monotonic() - started < seconds and not stop.is_set():
        now_ms = int(time.time() * 1000)
        async with client.pipeline(transaction=False) as pipe:
            for device in range(devices):
                body = make_payload(rng, now_ms - 800 - (device % 50))
                body["received_at"] = now_ms
                pipe.xadd(
                    stream,
                    {"v": "1", "imei": make_imei(device), "payload": orjson.dumps(body)},
                    maxlen=500_000,
                )
                sent += 1
            await pipe.execute()
        tick += 1
        await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
    await client.aclose()
    return sent


async def main(args: argparse.Namespace) -> None:
    name = f"soak_{uuid.uuid4().hex[:8]}"
    url = _db_url(name)
    stream = f"soak:{uuid.uuid4().hex[:8]}:records"
    await _admin(f'CREATE DATABASE "{name}"')
    proc: subprocess.Popen[bytes] | None = None
    try:
        settings = load_settings(database_url=url, redis_url=REDIS_URL, stream=stream)
        await prepare_database(url, settings, directus=True)
        port = 19000 + os.getpid() % 1000
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
        env.update(PROCESSOR_DATABASE_URL=url, PROCESSOR_REDIS_URL=REDIS_URL,
                   PROCESSOR_STREAM=stream, PROCESSOR_HTTP_PORT=str(port),
                   PROCESSOR_HTTP_HOST="127.0.0.1", PROCESSOR_LOG_LEVEL="warning")  # fmt: skip
        exe = str(Path(sys.executable).with_name("processor"))
        log = Path(f"/tmp/{name}.log").open("wb")  # noqa: ASYNC230, SIM115 - child log, whole run
        proc = subprocess.Popen([exe, "run"], env=env, stderr=log)  # noqa: ASYNC220 - long-lived child
        watched = psutil.Process(proc.pid)
        await asyncio.sleep(3)
        stop = asyncio.Event()
        producer = asyncio.create_task(produce(stream, args.devices, args.minutes * 60, stop))
        print(f"soak: {args.devices} devices × 1 Hz for {args.minutes} min, every {args.every} s")
        head = ("sample", "RSS MiB", "stored", "backlog", "lag p50 ≤", "lag p99 ≤")
        print("{:>6} {:>8} {:>10} {:>8} {:>10} {:>10}".format(*head))
        client = aioredis.Redis.from_url(REDIS_URL)
        before = lag_buckets(scrape(port))
        rss_series: list[float] = []
        p99_series: list[float] = []
        minute = 0
        while not producer.done():
            await asyncio.sleep(args.every)
            minute += 1
            text = scrape(port)
            after = lag_buckets(text)
            rss = watched.memory_info().rss / 2**20
            groups = await client.xinfo_groups(stream)
            backlog = sum(int(g.get("lag") or 0) + int(g["pending"]) for g in groups)
            p50, p99 = quantile(before, after, 0.5), quantile(before, after, 0.99)
            before = after
            rss_series.append(rss)
            p99_series.append(p99)
            print(
                f"{minute:>4} {rss:>8.0f} {stored(text):>10,} {backlog:>8,} {p50:>10} {p99:>10}",
                flush=True,
            )
        sent = await producer
        await client.aclose()
        warm = rss_series[len(rss_series) // 3 :] or rss_series
        print(
            f"sent {sent:,}; RSS after warm-up {min(warm):.0f}–{max(warm):.0f} MiB "
            f"(growth {max(warm) - warm[0]:+.0f} MiB); worst minute lag p99 ≤ {max(p99_series)} s "
            f"(target < 1 s)"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        redis_client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in redis_client.scan_iter(match=f"{stream}*")]
        if keys:
            await redis_client.delete(*keys)
        await redis_client.aclose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--every", type=float, default=60, help="seconds between samples")
    return parser.parse_args()


if __name__ == "__main__":
    del ADMIN_URL  # imported for the shared helpers' configuration only
    asyncio.run(main(parse()))
