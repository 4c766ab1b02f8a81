"""End to end: a simulated race through Redis and the processor equals an offline replay.

Rule 6 of the architecture: after the stream is drained, timing records, penalties, stage
results and anomalies are a deterministic function of the stored positions and the
course. The simulator injects its faults (duplicates, backlogs uploaded newest-first,
no-fix records, bad clocks, spikes, SOS, crash, ...); the processor runs for real; then the
stored rows are compared, row by row, with the domain evaluated offline over the stored
positions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from processor.adapters import domain_store
from processor.adapters.reference import import_course, parse_course
from processor.domain.engine import evaluate
from processor.service import serve
from processor.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSOR = str(Path(sys.executable).with_name("processor"))
RESULT_TABLES = ("timing_records", "penalties", "stage_results", "anomalies")
_OF_EVENT = {
    "timing_records": "event = $1",
    "penalties": "stage IN (SELECT id FROM stages WHERE event = $1)",
    "stage_results": "stage IN (SELECT id FROM stages WHERE event = $1)",
    "anomalies": "event = $1",
}


def simulate(settings: Settings, course_out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    cmd = [
        PROCESSOR, "simulate", "--seed", "4", "--vehicles", "12", "--length-km", "10",
        "--start", "2026-05-02T09:00:00Z", "--rate", "max",
        "--redis-url", settings.redis_dsn(), "--stream", settings.stream,
        "--course-out", str(course_out), "--summary", "json",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


async def stored_rows(
    conn: asyncpg.Connection, event_id: int
) -> dict[str, set[tuple[object, ...]]]:
    out: dict[str, set[tuple[object, ...]]] = {}
    for table, spec in zip(
        RESULT_TABLES,
        (domain_store.TIMING, domain_store.PENALTIES, domain_store.RESULTS, domain_store.ANOMALIES),
        strict=True,
    ):
        rows = await conn.fetch(f"SELECT * FROM {table} WHERE {_OF_EVENT[table]}", event_id)
        out[table] = {_key(spec, dict(r)) for r in rows}
    return out


def _key(spec: domain_store.Table, row: dict[str, object]) -> tuple[object, ...]:
    values = []
    for column in spec.columns:
        value = row[column]
        if column in spec.json_columns and isinstance(value, bytes | str):
            value = orjson.loads(value)
        if isinstance(value, Decimal):  # numeric(p, s) prints its scale: 39.70 is 39.7
            value = float(value)
        values.append(orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str))
    return tuple(values)


def replayed_rows(result: object) -> dict[str, set[tuple[object, ...]]]:
    r = result
    return {
        "timing_records": {
            _key(domain_store.TIMING, domain_store.timing_row(x)) for x in r.timing_records
        },  # type: ignore[attr-defined]
        "penalties": {
            _key(domain_store.PENALTIES, domain_store.penalty_row(x)) for x in r.penalties
        },  # type: ignore[attr-defined]
        "stage_results": {
            _key(domain_store.RESULTS, domain_store.result_row(x)) for x in r.stage_results
        },  # type: ignore[attr-defined]
        "anomalies": {
            _key(domain_store.ANOMALIES, domain_store.anomaly_row(x)) for x in r.anomalies
        },  # type: ignore[attr-defined]
    }


async def test_simulated_race_through_the_processor_equals_offline_replay(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    for table in RESULT_TABLES:
        await clean_db.execute(f"DELETE FROM {table}")
    course_file = tmp_path / "course.json"
    await asyncio.to_thread(simulate, settings, course_file)
    summary = await import_course(clean_db, parse_course(orjson.loads(course_file.read_bytes())))
    event_id = int(await clean_db.fetchval("SELECT id FROM events ORDER BY id DESC LIMIT 1"))
    del summary

    pipeline = await asyncio.wait_for(serve(settings, asyncio.Event(), burst=True), timeout=300)
    assert pipeline.stats.stored > 5_000

    course = await domain_store.load_course(clean_db, event_id)
    positions = await domain_store.load_positions(clean_db, course)
    expected = replayed_rows(
        evaluate(course, positions, now_ms=int(time.time() * 1000), source="live")
    )
    stored = await stored_rows(clean_db, event_id)
    for table in RESULT_TABLES:
        missing, extra = expected[table] - stored[table], stored[table] - expected[table]
        assert not missing, (table, "missing", [b"|".join(r) for r in sorted(missing)[:3]])
        assert not extra, (table, "extra", [b"|".join(r) for r in sorted(extra)[:3]])
    assert expected["timing_records"], "the race produced timing records"
    assert any(r[2] == b'"finished"' for r in expected["stage_results"])
