"""The hostile-input run: 10,000 malicious entries interleaved with 10,000 valid ones.

A real ``processor run`` process reads them all. Pass criteria: every valid record is
stored (hostile content inside ``$bytes`` verbatim, clocks decades off included), every
hostile entry is dead-lettered once with a reason, and the service never restarts (the
same process from start to end, one start-up in its log, exit 0 on SIGTERM).
"""

from __future__ import annotations

import base64
import collections
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from processor.settings import Settings

from .helpers import Producer, start_service, wait_drained, wait_started
from .hostile import generate
from .servers import PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTILE = 10_000
VALID = 10_000


async def stored(database_url: str) -> dict[tuple[int, int], dict[str, object]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint AS ts, io::text AS io"
            " FROM positions"
        )
    finally:
        await conn.close()
    return {(r["device_id"], r["ts"]): orjson.loads(r["io"]) for r in rows}


async def dead_letters(url: str, stream: str) -> list[dict[bytes, bytes]]:
    client = aioredis.Redis.from_url(url)
    try:
        return [fields for _, fields in await client.xrange(stream)]
    finally:
        await client.aclose()


async def test_hostile_entries_are_dead_lettered_and_valid_ones_stored_without_a_restart(
    fault_settings: Settings, private_redis: PrivateRedis, fault_db: str, tmp_path: Path
) -> None:
    generated = generate(HOSTILE, VALID, seed=2026)
    producer = Producer(private_redis.url, fault_settings.stream, generated.entries, 5_000)
    service = start_service(
        fault_settings, tmp_path / "processor.log", PROCESSOR_DOMAIN_ENABLED="true"
    )
    try:
        await wait_started(service)
        pid = service.process.pid
        started = time.monotonic()
        await producer.run()
        await wait_drained(private_redis.url, fault_settings, len(generated.entries), service)
        elapsed = time.monotonic() - started
        dead_metric = service.metric("processor_dead_letters_total")
        assert service.process.poll() is None, service.output()[-3000:]
        assert await service.stop() == 0, service.output()[-3000:]
    finally:
        service.kill()
    assert service.process.pid == pid
    assert service.output().count("processor started") == 1

    rows = await stored(fault_db)
    valid = [generated.entries[i] for i in generated.valid]
    expected = {(int(e[b"imei"]), orjson.loads(e[b"payload"])["ts"]) for e in valid}
    assert set(rows) == expected
    for fields in valid:  # hostile bytes inside valid records are stored as they came
        body = orjson.loads(fields[b"payload"])
        raw = body["io"].get("256")
        if raw is not None:
            stored_io = rows[(int(fields[b"imei"]), body["ts"])]
            assert stored_io["256"] == base64.b64decode(raw["$bytes"]).hex()

    dead = await dead_letters(private_redis.url, fault_settings.dead_letter_stream)
    ids = {f"{producer.base_ms}-{i + 1}" for i in generated.kinds}
    assert len(dead) == HOSTILE == dead_metric
    assert {d[b"source_id"].decode() for d in dead} == ids
    assert all(d[b"reason"] and d[b"detail"] for d in dead)
    by_id = {f"{producer.base_ms}-{i + 1}": kind for i, kind in generated.kinds.items()}
    reasons = collections.Counter(
        (by_id[d[b"source_id"].decode()], d[b"reason"].decode()) for d in dead
    )
    print(f"\n[hostile] {HOSTILE} hostile + {VALID} valid entries in {elapsed:.1f}s, pid {pid}")
    for (kind, reason), count in sorted(reasons.items()):
        print(f"[hostile]   {kind:28} {reason:20} {count:5}")
