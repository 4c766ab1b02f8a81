"""Three processor instances on one stream, one killed mid-race (SIGKILL).

Pass criteria: every record the simulator sent is stored exactly once, nothing is left
pending, and the domain rows equal an offline replay of the stored positions.
"""

from __future__ import annotations

import asyncio
import csv
import signal
import subprocess
import sys
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

from ..integration.pipeline_helpers import processor_env, stored_keys
from .test_live_equals_replay import RESULT_TABLES, replayed_rows, stored_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSOR = str(Path(sys.executable).with_name("processor"))
START = "2026-05-03T09:00:00Z"


def base_env(settings: Settings) -> dict[str, str]:
    return processor_env(
        settings,
        PROCESSOR_HTTP_PORT="0",
        PROCESSOR_CLAIM_IDLE_MS="2000",
        PROCESSOR_DOMAIN_LEASE_TTL_MS="3000",
        PROCESSOR_DOMAIN_TICK_S="1",
        PROCESSOR_BATCH_MAX_SIZE="500",
        PROCESSOR_LOG_LEVEL="warning",
        PROCESSOR_DISPATCH_ENABLED="false",
    )


def course_file(settings: Settings, path: Path) -> None:
    cmd = [PROCESSOR, "simulate", "--seed", "9", "--vehicles", "12", "--length-km", "10",
           "--start", START, "--prepare-only", "--course-out", str(path)]  # fmt: skip
    done = subprocess.run(cmd, env=base_env(settings), capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def simulator(settings: Settings, positions_csv: Path) -> subprocess.Popen[bytes]:
    cmd = [PROCESSOR, "simulate", "--seed", "9", "--vehicles", "12", "--length-km", "10",
           "--start", START, "--rate", "realtime", "--speed", "40",
           "--positions-csv", str(positions_csv), "--summary", "json"]  # fmt: skip
    return subprocess.Popen(
        cmd, env=base_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def instance(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    env = base_env(settings) | {"PROCESSOR_CONSUMER": name}
    return subprocess.Popen([PROCESSOR, "run"], env=env, stderr=subprocess.PIPE)


async def drained(client: aioredis.Redis, settings: Settings, shards: int) -> bool:
    groups = await client.xinfo_groups(settings.stream)
    group = next(g for g in groups if g["name"] in (b"processor", "processor"))
    if group["pending"] or group.get("lag"):
        return False
    for shard in range(shards):
        if await client.xlen(f"{settings.stream}:domain:{shard}"):
            return False
    return True


def sent_keys(path: Path) -> set[tuple[int, int]]:
    with path.open(newline="") as handle:
        return {(int(row["imei"]), int(row["ts"])) for row in csv.DictReader(handle)}


async def test_three_instances_one_killed_lose_nothing_and_equal_replay(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    for table in RESULT_TABLES:
        await clean_db.execute(f"DELETE FROM {table}")
    await clean_db.execute("DELETE FROM processor.domain_shards")
    course_path, positions_csv = tmp_path / "course.json", tmp_path / "positions.csv"
    await asyncio.to_thread(course_file, settings, course_path)
    await import_course(clean_db, parse_course(orjson.loads(course_path.read_bytes())))
    event_id = int(await clean_db.fetchval("SELECT id FROM events ORDER BY id DESC LIMIT 1"))

    procs = {name: instance(settings, name) for name in ("one", "two", "three")}
    await asyncio.sleep(3)  # started and holding their leases
    sim = simulator(settings, positions_csv)
    try:
        await asyncio.sleep(8)
        owners = await aredis.mget(
            [f"{settings.stream}:domain:shard:{k}:owner" for k in range(settings.domain_shards)]
        )
        orphaned = [k for k, owner in enumerate(owners) if owner == b"two"]
        assert orphaned, "instance two held no shard when killed"
        procs["two"].send_signal(signal.SIGKILL)  # mid-race: leases and pending entries orphaned
        await asyncio.to_thread(procs["two"].communicate)
        _, err = await asyncio.to_thread(sim.communicate, timeout=240)
        assert sim.returncode == 0, err.decode()[-2000:]
        deadline = time.monotonic() + 90
        while not await drained(aredis, settings, settings.domain_shards):
            assert time.monotonic() < deadline, "not drained in time"
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # a last tick
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            _, errors = await asyncio.to_thread(proc.communicate, timeout=60)
            if name != "two":
                assert proc.returncode == 0, errors.decode()[-3000:]

    keys = await stored_keys(clean_db)
    assert len(keys) == len(set(keys)), "a position stored twice"
    assert set(keys) == sent_keys(positions_csv), "a position lost"
    taken_over = await clean_db.fetch(
        "SELECT owner FROM processor.domain_shards WHERE shard = ANY($1::int[])", orphaned
    )
    assert {r["owner"] for r in taken_over} & {"one", "three"}, "no shard of two was taken over"

    course = await domain_store.load_course(clean_db, event_id)
    positions = await domain_store.load_positions(clean_db, course)
    expected = replayed_rows(
        evaluate(course, positions, now_ms=int(time.time() * 1000), source="live")
    )
    stored = await stored_rows(clean_db, event_id)
    for table in RESULT_TABLES:
        assert stored[table] == expected[table], table
    assert expected["timing_records"]
