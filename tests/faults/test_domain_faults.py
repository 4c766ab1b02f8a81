"""A simulated race through ``processor run`` while PostgreSQL restarts and Redis is killed.

With the domain on: after the streams are drained, every record is stored once and the
result tables (timing, penalties, results, anomalies) equal an offline replay of the
stored positions — the faults changed nothing (ARCHITECTURE.md rule 6).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from processor.adapters import domain_store
from processor.adapters.reference import import_course, parse_course
from processor.domain.engine import evaluate
from processor.settings import Settings

from ..e2e.test_live_equals_replay import RESULT_TABLES, replayed_rows, stored_rows
from .helpers import PROCESSOR, Producer, recovery_after, report, start_service, wait_started
from .servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def simulate(out: Path, course: Path) -> list[dict[bytes, bytes]]:
    cmd = [PROCESSOR, "simulate", "--seed", "9", "--vehicles", "12", "--length-km", "10",
           "--start", "2026-05-03T09:00:00Z", "--out", str(out),
           "--course-out", str(course)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = out.read_bytes().splitlines()
    return [{k.encode(): v.encode() for k, v in orjson.loads(line).items()} for line in lines]


async def drained(url: str, settings: Settings) -> bool:
    """The processor group has nothing pending or undelivered, nor has any domain stream."""
    client = aioredis.Redis.from_url(url)
    try:
        for info in await client.xinfo_groups(settings.stream):
            if info["name"] in (b"processor", "processor") and (info["pending"] or info["lag"]):
                return False
        for shard in range(settings.domain_shards):
            if await client.xlen(f"{settings.stream}:domain:{shard}"):
                return False
        return True
    except OSError:
        return False
    finally:
        await client.aclose()


async def stream_state(url: str, settings: Settings) -> dict[str, object]:
    """The groups and non-empty domain streams, for a failure message."""
    client = aioredis.Redis.from_url(url)
    try:
        state: dict[str, object] = {"groups": await client.xinfo_groups(settings.stream)}
        for shard in range(settings.domain_shards):
            stream = f"{settings.stream}:domain:{shard}"
            if await client.xlen(stream):
                state[stream] = {
                    "len": await client.xlen(stream),
                    "groups": await client.xinfo_groups(stream),
                }
        return state
    finally:
        await client.aclose()


async def test_a_race_through_restarts_of_both_servers_equals_the_offline_replay(
    fault_settings: Settings,
    fault_db: str,
    private_pg: PrivatePostgres,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    entries = simulate(tmp_path / "entries.jsonl", tmp_path / "course.json")
    conn = await asyncpg.connect(fault_db)
    try:
        await import_course(
            conn, parse_course(orjson.loads((tmp_path / "course.json").read_bytes()))
        )
        event_id = int(await conn.fetchval("SELECT id FROM events ORDER BY id DESC LIMIT 1"))
    finally:
        await conn.close()

    producer = Producer(private_redis.url, fault_settings.stream, entries, rate_per_s=800)
    service = start_service(
        fault_settings,
        tmp_path / "processor.log",
        PROCESSOR_DOMAIN_LEASE_TTL_MS="3000",
        PROCESSOR_DOMAIN_TICK_S="1",
        PROCESSOR_BATCH_MAX_SIZE="500",
    )
    try:
        await wait_started(service)
        feeding = asyncio.create_task(producer.run())
        while producer.sent < len(entries) // 3:  # noqa: ASYNC110 - a plain counter
            await asyncio.sleep(0.05)
        await asyncio.to_thread(private_pg.restart, "fast")
        pg_recovery = await recovery_after(service, time.monotonic())
        while producer.sent < 2 * len(entries) // 3:  # noqa: ASYNC110 - a plain counter
            await asyncio.sleep(0.05)
        await asyncio.to_thread(private_redis.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_redis.start)
        redis_recovery = await recovery_after(service, time.monotonic())
        await feeding
        deadline = time.monotonic() + 90
        while not await drained(private_redis.url, fault_settings):
            assert service.process.poll() is None, service.output()[-3000:]
            if time.monotonic() > deadline:
                state = await stream_state(private_redis.url, fault_settings)
                raise AssertionError(f"not drained: {state}\n" + service.output()[-3000:])
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # a last tick
        assert await service.stop() == 0, service.output()[-3000:]
    finally:
        service.kill()

    conn = await asyncpg.connect(fault_db)
    try:
        count = await conn.fetchval("SELECT count(*) FROM positions")
        sent = {(e[b"imei"], orjson.loads(e[b"payload"])["ts"]) for e in entries}
        assert count == len(sent)
        course = await domain_store.load_course(conn, event_id)
        positions = await domain_store.load_positions(conn, course)
        expected = replayed_rows(
            evaluate(course, positions, now_ms=int(time.time() * 1000), source="live")
        )
        stored = await stored_rows(conn, event_id)
    finally:
        await conn.close()
    for table in RESULT_TABLES:
        missing, extra = expected[table] - stored[table], stored[table] - expected[table]
        assert not missing, (table, "missing", sorted(missing)[:3])
        assert not extra, (table, "extra", sorted(extra)[:3])
    assert expected["timing_records"]
    report(
        "race with domain: pg restart, then redis kill -9",
        pg_first_commit_after_up=pg_recovery,
        redis_first_commit_after_up=redis_recovery,
        records=len(sent),
        timing_records=len(expected["timing_records"]),
    )
