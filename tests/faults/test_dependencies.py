"""Fault injection on the processor's dependencies, with real processes and real servers.

Each test runs ``processor run`` against private servers while a producer appends entries
at a steady rate, injects one kind of failure mid-stream, and then checks the pass
criteria: every valid record stored exactly once, every malformed entry dead-lettered
once, nothing left pending, the process still the same one (it recovered by itself) and
exiting 0 on SIGTERM. The recovery time is printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from processor.settings import Settings

from .helpers import (
    Producer,
    assert_each_stored_once,
    recovery_after,
    report,
    start_service,
    wait_drained,
    wait_started,
    workload,
)
from .servers import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 30_000
RATE = 4_000  # entries/s: the stream is still being written during the fault


async def until_sent(producer: Producer, count: int) -> None:
    while producer.sent < count:  # noqa: ASYNC110 - progress is a plain counter
        await asyncio.sleep(0.02)


async def test_postgres_restart_mid_stream_loses_and_duplicates_nothing(
    fault_settings: Settings, private_pg: PrivatePostgres, fault_db: str, tmp_path: Path
) -> None:
    work = workload(TOTAL, seed=21)
    producer = Producer(fault_settings.redis_dsn(), fault_settings.stream, work.entries, RATE)
    service = start_service(fault_settings, tmp_path / "processor.log")
    try:
        await wait_started(service)
        feeding = asyncio.create_task(producer.run())
        await until_sent(producer, TOTAL // 3)
        down = time.monotonic()
        await asyncio.to_thread(private_pg.restart, "fast")
        back = time.monotonic()
        recovery = await recovery_after(service, back)
        await feeding
        drained = await wait_drained(fault_settings.redis_dsn(), fault_settings, TOTAL, service)
        retries = service.metric("processor_retries_total", 'dependency="postgres"')
        assert await service.stop() == 0, service.output()[-3000:]
    finally:
        service.kill()
    assert retries > 0
    assert "dependency unavailable, retrying" in service.output()
    await assert_each_stored_once(fault_db, fault_settings.redis_dsn(), fault_settings, work)
    report(
        "postgres restart -m fast",
        server_down=back - down,
        first_commit_after_up=recovery,
        drained_after=drained,
        retries=int(retries),
    )


async def test_redis_killed_and_restarted_redelivers_from_the_persisted_pel(
    fault_settings: Settings, private_redis: PrivateRedis, fault_db: str, tmp_path: Path
) -> None:
    work = workload(TOTAL, seed=22)
    producer = Producer(private_redis.url, fault_settings.stream, work.entries, RATE)
    service = start_service(fault_settings, tmp_path / "processor.log")
    try:
        await wait_started(service)
        feeding = asyncio.create_task(producer.run())
        await until_sent(producer, TOTAL // 3)
        down = time.monotonic()
        await asyncio.to_thread(private_redis.kill)
        await asyncio.sleep(1.0)  # an outage long enough for reads, acks and the producer to fail
        await asyncio.to_thread(private_redis.start)
        back = time.monotonic()
        recovery = await recovery_after(service, back)
        await feeding
        drained = await wait_drained(private_redis.url, fault_settings, TOTAL, service)
        retries = service.metric("processor_retries_total", 'dependency="redis"')
        redelivered = service.metric("processor_entries_read_total", 'phase="pending"')
        assert await service.stop() == 0, service.output()[-3000:]
    finally:
        service.kill()
    assert retries > 0
    assert producer.outages > 0
    await assert_each_stored_once(fault_db, private_redis.url, fault_settings, work)
    report(
        "redis kill -9 and restart (AOF)",
        server_down=back - down,
        first_commit_after_up=recovery,
        drained_after=drained,
        retries=int(retries),
        redelivered_from_pel=int(redelivered),
    )


async def kill_connections(database_url: str, redis_url: str) -> None:
    """Terminate every other backend of the database and every normal Redis client."""
    conn = await asyncpg.connect(database_url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await client.aclose()
        await conn.close()


async def test_killed_connections_of_both_servers_lose_nothing(
    fault_settings: Settings, private_redis: PrivateRedis, fault_db: str, tmp_path: Path
) -> None:
    work = workload(TOTAL, seed=23)
    producer = Producer(private_redis.url, fault_settings.stream, work.entries, RATE)
    service = start_service(fault_settings, tmp_path / "processor.log")
    recoveries = []
    try:
        await wait_started(service)
        feeding = asyncio.create_task(producer.run())
        await until_sent(producer, TOTAL // 4)
        for _ in range(5):
            await kill_connections(fault_db, private_redis.url)
            recoveries.append(await recovery_after(service, time.monotonic()))
            await asyncio.sleep(0.4)
        await feeding
        drained = await wait_drained(private_redis.url, fault_settings, TOTAL, service)
        assert await service.stop() == 0, service.output()[-3000:]
    finally:
        service.kill()
    assert "dependency unavailable, retrying" in service.output()
    await assert_each_stored_once(fault_db, private_redis.url, fault_settings, work)
    report(
        "pg_terminate_backend + CLIENT KILL TYPE normal, 5 times",
        worst_first_commit_after_kill=max(recoveries),
        drained_after=drained,
    )
