"""The DuckDB queries of docs/export.md run as written on an exported dataset and are right."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import redis.asyncio as aioredis

from processor.settings import Settings
from processor.tools.export import run_export

from .test_export_helpers import BASE_TS, entry, imei, xadd_all

pytestmark = pytest.mark.integration

DOC = Path(__file__).parents[2] / "docs" / "export.md"
PLACEHOLDER = "/data/export"
STEP_DEG = 0.001
IBUTTON = 2**64 - 5


def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def fix(device: int, second: int, lat: float, *, sat: int = 9, speed: int = 40) -> dict[str, bytes]:
    fields = entry(device, BASE_TS + second * 1_000, second)
    body = orjson.loads(fields["payload"])
    body.update(lat=lat, lon=15.0, sat=sat, speed=speed)
    body["io"] = {"66": 12_850, "78": {"$bigint": str(IBUTTON)}, "256": {"$bytes": "V1ZX"}}
    fields["payload"] = orjson.dumps(body)
    return fields


def race() -> list[dict[str, bytes]]:
    """Car 1 drives 100 steps north at 1 Hz; car 2 has a 91 s gap and one no-fix reboot."""
    car1 = [fix(1, s, 45.0 + s * STEP_DEG, speed=40 + s % 10) for s in range(101)]
    car2 = [fix(2, s, 46.0) for s in range(20)] + [fix(2, s, 46.0) for s in range(110, 130)]
    reboot = fix(2, 131, 0.0, sat=0, speed=0)
    resent = car1[50]  # a device resend: the view keeps one
    return [*car1, *car2, reboot, resent]


@pytest.fixture
async def results(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> list[list[tuple[Any, ...]]]:
    await xadd_all(aredis, settings.stream, race())
    await run_export(settings, tmp_path, burst=True, handle_signals=False)
    queries = [q.replace(PLACEHOLDER, str(tmp_path)) for q in doc_queries()]
    with duckdb.connect() as con:
        return [con.execute(query).fetchall() for query in queries]


def test_the_guide_has_the_queries_this_test_checks() -> None:
    queries = doc_queries()
    assert len(queries) == 5
    assert PLACEHOLDER in queries[0]  # the view reads the dataset; the others read the view


def test_speed_per_stage(results: list[list[tuple[Any, ...]]]) -> None:
    by_car = {(stage, car): (fixes, avg, top) for stage, car, fixes, avg, top in results[1]}
    assert by_car[("SS1", imei(1))] == (101, pytest.approx(44.5, abs=0.1), 49)
    assert by_car[("SS1", imei(2))][0] == 40  # the no-fix reboot record is left out
    assert {stage for stage, _ in by_car} == {"SS1"}


def test_distance_per_vehicle(results: list[list[tuple[Any, ...]]]) -> None:
    km = dict(results[2])
    expected = 100 * math.radians(STEP_DEG) * 6371.0088
    assert km[imei(1)] == pytest.approx(expected, abs=0.002)
    assert km[imei(2)] == 0  # standing still; the 0,0 reboot position is excluded


def test_data_gaps(results: list[list[tuple[Any, ...]]]) -> None:
    ((car, _, _, gap),) = results[3]
    assert car == imei(2)
    assert gap.total_seconds() == 91


def test_raw_io_values_are_exact(results: list[list[tuple[Any, ...]]]) -> None:
    rows = results[4]
    assert len(rows) == 10
    assert {(volts, ibutton, vin) for _, _, volts, ibutton, vin in rows} == {
        (12_850, IBUTTON, "WVW")
    }
