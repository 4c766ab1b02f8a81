"""Crash tests with real processes: SIGKILL mid-stream, and killed database connections."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from processor.settings import Settings

from .pipeline_helpers import MALFORMED, entry, processor_env, shuffled, stored_keys, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSOR = str(Path(sys.executable).with_name("processor"))
LOGS: dict[int, IO[bytes]] = {}


def build_stream(total: int, seed: int) -> tuple[list[dict[str, bytes]], set[tuple[int, int]], int]:
    """``total`` entries: 1,000 devices, ~3% resent, ~1% malformed, some out of order."""
    rng = random.Random(seed)
    valid_count = int(total * 0.96)
    valid = [entry(i % 1000, i // 1000) for i in range(valid_count)]
    # a coverage-gap backlog uploaded newest-first, late
    backlog = valid[1000:6000]
    stream = valid[:1000] + valid[6000:] + backlog[::-1]
    resent = [rng.choice(valid) for _ in range(int(total * 0.03))]
    malformed = [MALFORMED[i % len(MALFORMED)][0] for i in range(total - valid_count - len(resent))]
    mixed = stream + resent + malformed
    for _ in range(len(mixed) // 50):  # local shuffles: real out-of-order, not a full permutation
        i = rng.randrange(len(mixed) - 20)
        window = mixed[i : i + 20]
        rng.shuffle(window)
        mixed[i : i + 20] = window
    expected = {(int(e["imei"]), orjson.loads(e["payload"])["ts"]) for e in valid}
    return mixed, expected, len(malformed)


def env_for(settings: Settings, consumer: str) -> dict[str, str]:
    return processor_env(
        settings,
        PROCESSOR_CONSUMER=consumer,
        PROCESSOR_HTTP_PORT="0",
        PROCESSOR_CLAIM_IDLE_MS="1000",
        # Kills come faster than a loaded machine starts a process, so one batch may be
        # delivered to five processes that all die before committing it: that is not the
        # poison entry PROCESSOR_MAX_DELIVERIES protects against.
        PROCESSOR_MAX_DELIVERIES="100",
        PROCESSOR_LOG_LEVEL="warning",
        PROCESSOR_DOMAIN_ENABLED="false",
    )


def start(settings: Settings, consumer: str, *args: str) -> subprocess.Popen[bytes]:
    # Logs go to a file, not a pipe: a pipe nobody reads fills up and blocks the child.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the child until it exits
    proc = subprocess.Popen([PROCESSOR, "run", *args], env=env_for(settings, consumer), stderr=log)
    LOGS[proc.pid] = log
    return proc


def log_of(proc: subprocess.Popen[bytes]) -> bytes:
    """Everything the child wrote to stderr (call after it exited)."""
    log = LOGS.pop(proc.pid)
    log.seek(0)
    data = log.read()
    log.close()
    return bytes(data)


async def wait_for_rows(conn: asyncpg.Connection, timeout_s: float = 60) -> None:
    """Wait until the processor under test has stored something (it is past start-up)."""
    for _ in range(int(timeout_s * 10)):
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM positions)"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the processor stored nothing")


async def finish_burst(settings: Settings, consumer: str) -> None:
    proc = start(settings, consumer, "--burst")
    await asyncio.to_thread(proc.wait, timeout=240)
    assert proc.returncode == 0, log_of(proc).decode()[-2000:]


async def assert_exactly_once(
    conn: asyncpg.Connection,
    client: aioredis.Redis,
    settings: Settings,
    expected: set[tuple[int, int]],
    malformed: int,
) -> None:
    keys = await stored_keys(conn)
    assert len(keys) == len(set(keys))
    assert set(keys) == expected
    dead = await client.xrange(settings.dead_letter_stream)
    assert len(dead) == malformed
    assert len({fields[b"source_id"] for _, fields in dead}) == malformed
    assert (await client.xpending(settings.stream, settings.group))["pending"] == 0


async def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    entries, expected, malformed = build_stream(200_000, seed=11)
    await xadd_all(aredis, settings.stream, entries)
    rng = random.Random(5)
    for round_no in range(5):
        # Every other restart comes back under a new name: the claim path (XAUTOCLAIM)
        # then takes over the dead consumer's pending entries.
        proc = start(settings, f"crash-{round_no // 2}")
        await asyncio.sleep(rng.uniform(1.2, 2.5))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        log_of(proc)
        assert proc.returncode == -signal.SIGKILL
    await asyncio.sleep(1.2)  # let the last consumer's entries become idle for claiming
    await finish_burst(settings, "crash-final")
    await finish_burst(settings, "crash-2")  # the last killed name's own pending, if any

    await assert_exactly_once(clean_db, aredis, settings, expected, malformed)


async def test_terminated_database_connections_lose_nothing(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    entries, expected, malformed = build_stream(60_000, seed=3)
    await xadd_all(aredis, settings.stream, shuffled(entries[:10_000]))
    proc = start(settings, "terminated")
    try:
        await wait_for_rows(clean_db)
        # Entries keep coming in small chunks and connections are killed right after
        # each, so kills land while batches are being written (a processor that keeps up
        # would otherwise only ever lose idle connections, which the pool replaces).
        rest = entries[10_000:]
        for start_at in range(0, len(rest), 2_000):
            await xadd_all(aredis, settings.stream, rest[start_at : start_at + 2_000])
            for _ in range(5):
                await asyncio.sleep(0.02)
                await clean_db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
        await asyncio.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, timeout=60)
    err = log_of(proc)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"dependency unavailable, retrying" in err
    await finish_burst(settings, "terminated")

    await assert_exactly_once(clean_db, aredis, settings, expected, malformed)
