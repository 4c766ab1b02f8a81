"""Real processes, a paced producer and the pass criteria shared by the fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from processor.settings import Settings

from ..integration.pipeline_helpers import MALFORMED, entry
from ..integration.pipeline_helpers import processor_env as base_env
from .servers import free_port

PROCESSOR = str(Path(sys.executable).with_name("processor"))
Fields = dict[str, bytes]


# --- the stream --------------------------------------------------------------------------


@dataclass
class Workload:
    """Entries to produce, the (device_id, ts) keys expected stored and the malformed count."""

    entries: list[Fields]
    expected: set[tuple[int, int]]
    malformed: int


def workload(total: int, seed: int, devices: int = 500) -> Workload:
    """``total`` entries: ~3% device resends, ~1% malformed, locally shuffled."""
    rng = random.Random(seed)
    valid = [entry(i % devices, i // devices) for i in range(int(total * 0.96))]
    resent = [rng.choice(valid) for _ in range(int(total * 0.03))]
    malformed = [MALFORMED[i % len(MALFORMED)][0] for i in range(total - len(valid) - len(resent))]
    mixed = valid + resent + malformed
    for _ in range(len(mixed) // 50):  # local out-of-order windows, as devices do
        i = rng.randrange(len(mixed) - 20)
        window = mixed[i : i + 20]
        rng.shuffle(window)
        mixed[i : i + 20] = window
    expected = {(int(e["imei"]), orjson.loads(e["payload"])["ts"]) for e in valid}
    return Workload(mixed, expected, len(malformed))


@dataclass
class Producer:
    """Appends entries at a steady rate with explicit ids, surviving Redis outages.

    Explicit, increasing ids make producing idempotent: after a connection error the
    chunk is sent again and the entries Redis already had are refused as "ID equal or
    smaller", so the stream holds each entry exactly once (as ingestion would ensure).
    """

    url: str
    stream: str
    entries: list[Fields]
    rate_per_s: float = 5_000
    chunk: int = 250
    sent: int = 0
    outages: int = 0
    base_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    async def run(self) -> None:
        client = aioredis.Redis.from_url(self.url, socket_timeout=5)
        started = time.monotonic()
        try:
            while self.sent < len(self.entries):
                end = min(self.sent + self.chunk, len(self.entries))
                if not await self._send(client, self.sent, end):
                    self.outages += 1
                    await asyncio.sleep(0.2)
                    continue
                self.sent = end
                ahead = started + self.sent / self.rate_per_s - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await client.aclose()

    async def _send(self, client: aioredis.Redis, start: int, end: int) -> bool:
        try:
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, end):
                    pipe.xadd(self.stream, self.entries[i], id=f"{self.base_ms}-{i + 1}")  # type: ignore[arg-type]
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError):
            return False
        for result in results:
            if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                continue  # persisted before the outage: already in the stream
            if isinstance(result, Exception):
                return False
        return True


# --- the processor as a real process -----------------------------------------------------


@dataclass
class Service:
    """A ``processor run`` process with its metrics port and log file."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0.0 if none)."""
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        total = 0.0
        for found in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.MULTILINE):
            if found.group(1) == name and labels in (found.group(2) or ""):
                total += float(found.group(3))
        return total

    def committed(self) -> float:
        """Records stored or found already stored: moves whenever a batch commits."""
        return self.metric("processor_records_written_total") + self.metric(
            "processor_duplicates_total"
        )

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def processor_env(settings: Settings, **extra: str) -> dict[str, str]:
    defaults = {
        "PROCESSOR_CONSUMER": settings.consumer,
        "PROCESSOR_CLAIM_IDLE_MS": "2000",
        "PROCESSOR_RETRY_MAX_S": "1",
        "PROCESSOR_LOG_FORMAT": "console",
        "PROCESSOR_LOG_LEVEL": "info",
        "PROCESSOR_DOMAIN_ENABLED": "true",
    }
    return base_env(settings, **(defaults | extra))


def start_service(settings: Settings, log: Path, **extra: str) -> Service:
    """Start ``processor run`` against ``settings``; its output goes to ``log``."""
    port = free_port()
    env = processor_env(settings, PROCESSOR_HTTP_PORT=str(port), **extra)
    with log.open("ab") as out:
        process = subprocess.Popen([PROCESSOR, "run"], env=env, stdout=out, stderr=out)
    return Service(process, port, log)


async def wait_started(service: Service, seconds: float = 60) -> None:
    """Until the service answers /readyz with 200 (it is past start-up)."""
    deadline = time.monotonic() + seconds
    while not service.ready():
        assert service.process.poll() is None, service.output()[-3000:]
        if time.monotonic() > deadline:
            raise AssertionError("the processor did not start: " + service.output()[-3000:])
        await asyncio.sleep(0.1)


async def recovery_after(service: Service, since: float, seconds: float = 60) -> float:
    """Seconds from ``since`` (a monotonic time) until the service commits a batch again."""
    before = service.committed()
    deadline = time.monotonic() + seconds
    while service.committed() <= before:
        assert service.process.poll() is None, service.output()[-3000:]
        if time.monotonic() > deadline:
            raise AssertionError("no progress after the fault: " + service.output()[-3000:])
        await asyncio.sleep(0.02)
    return time.monotonic() - since


# --- pass criteria -----------------------------------------------------------------------


async def group_idle(client: aioredis.Redis, stream: str, group: str, total: int) -> bool:
    """True when the stream holds ``total`` entries, all delivered and acknowledged."""
    with contextlib.suppress(RedisError, OSError):
        if await client.xlen(stream) != total:
            return False
        for info in await client.xinfo_groups(stream):
            if info["name"] in (group, group.encode()):
                return int(info["pending"]) == 0 and int(info["lag"] or 0) == 0
    return False


async def wait_drained(
    url: str, settings: Settings, total: int, service: Service, seconds: float = 90
) -> float:
    """Seconds until every produced entry is acknowledged by the processor's group."""
    started = time.monotonic()
    client = aioredis.Redis.from_url(url)
    try:
        while not await group_idle(client, settings.stream, settings.group, total):
            assert service.process.poll() is None, service.output()[-3000:]
            if time.monotonic() - started > seconds:
                raise AssertionError("stream not drained: " + service.output()[-3000:])
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    return time.monotonic() - started


async def assert_each_stored_once(
    database_url: str, redis_url: str, settings: Settings, work: Workload
) -> None:
    """Every valid record stored once, every malformed entry dead-lettered once, none pending."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint AS ts FROM positions"
        )
    finally:
        await conn.close()
    keys = [(r["device_id"], r["ts"]) for r in rows]
    assert len(keys) == len(set(keys)), "a position was stored twice"
    assert set(keys) == work.expected, (
        f"missing {len(work.expected - set(keys))}, unexpected {len(set(keys) - work.expected)}"
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        dead = await client.xrange(settings.dead_letter_stream)
        assert len({fields[b"source_id"] for _, fields in dead}) == len(dead) == work.malformed
        assert (await client.xpending(settings.stream, settings.group))["pending"] == 0
    finally:
        await client.aclose()


def report(name: str, **figures: float | int | str) -> None:
    """Print a test's recovery figures (shown with ``pytest -s`` and in the report)."""
    shown = ", ".join(
        f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[fault] {name}: {shown}")
