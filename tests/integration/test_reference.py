"""Reference data against real PostgreSQL: course files, devices, IO mapping seeds and reloads.

Each test bootstraps the Directus tables in a PostgreSQL schema of its own, so ids start
at 1 and nothing leaks between tests sharing the session database.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from processor.adapters.course_cli import course as course_cli
from processor.adapters.course_cli import devices as devices_cli
from processor.adapters.directus_schema import bootstrap
from processor.adapters.mappings import MappingCache
from processor.adapters.reference import (
    dump_course,
    export_course,
    import_course,
    parse_course,
    read_io_csv,
    seed_io_mappings,
)
from processor.core.records import Record

pytestmark = pytest.mark.integration

IMEI_A = "356307042441013"
IMEI_B = "356307042441021"
IMEI_UNKNOWN = 352094080000001


def square(lon: float, lat: float, d: float = 0.001) -> dict[str, Any]:
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
    return {"type": "Polygon", "coordinates": [ring]}


def feature(geometry: dict[str, Any], **properties: Any) -> dict[str, Any]:
    base = {
        "radius_m": None,
        "speed_limit_kmh": None,
        "waypoint_type": None,
        "penalty_s": None,
        "sequence": 0,
    }
    return {"type": "Feature", "geometry": geometry, "properties": {**base, **properties}}


def canonical_course() -> dict[str, Any]:
    """A course file exactly as export writes it for a fresh database (ids from 1)."""
    gate = {"type": "LineString", "coordinates": [[15.9701, 45.8101], [15.9711, 45.8101]]}
    finish = {"type": "LineString", "coordinates": [[15.9901, 45.8201], [15.9911, 45.8201]]}
    return {
        "event": {
            "id": 1,
            "name": "Rally Zagorje 2026",
            "starts_at": "2026-06-01T06:00:00.000Z",
            "ends_at": "2026-06-02T18:00:00.000Z",
            "timezone": "Europe/Zagreb",
            "status": "live",
            "rules": {"max_speed_kmh": 250, "missed_waypoint_penalty_s": {"default": 900}},
        },
        "stages": [
            {
                "id": 1,
                "name": "SS1 Kumrovec",
                "sequence": 1,
                "kind": "special",
                "opens_at": "2026-06-01T08:00:00.000Z",
                "closes_at": "2026-06-01T12:00:00.000Z",
                "start_mode": "scheduled",
                "status": "open",
            },
            {
                "id": 2,
                "name": "Liaison 1",
                "sequence": 2,
                "kind": "liaison",
                "opens_at": None,
                "closes_at": None,
                "start_mode": "gate",
                "status": "scheduled",
            },
        ],
        "geofences": {
            "type": "FeatureCollection",
            "features": [
                feature(gate, id=1, stage=1, kind="start", name="Start", sequence=1),
                feature(
                    {"type": "Point", "coordinates": [15.98, 45.815]},
                    id=2,
                    stage=1,
                    kind="waypoint",
                    name="WP1",
                    sequence=2,
                    radius_m=90.5,
                    waypoint_type="WPM",
                    penalty_s=600,
                ),
                feature(
                    square(15.975, 45.812),
                    id=3,
                    stage=1,
                    kind="speed_zone",
                    name="Village",
                    sequence=3,
                    speed_limit_kmh=50.0,
                ),
                feature(finish, id=4, stage=1, kind="finish", name="Finish", sequence=4),
                feature(square(16.0, 45.9), id=5, stage=None, kind="forbidden_zone", name="Farm"),
            ],
        },
        "entries": [
            {
                "id": 1,
                "number": 7,
                "name": "Ana Horvat",
                "class": "RC2",
                "imei": IMEI_A,
                "valid_from": "2026-06-01T00:00:00.000Z",
                "valid_to": None,
                "status": "active",
            },
            {
                "id": 2,
                "number": 12,
                "name": "Ivo Kovač",
                "class": "RC4",
                "imei": IMEI_B,
                "valid_from": None,
                "valid_to": None,
                "status": "withdrawn",
            },
        ],
        "start_times": [
            {"id": 1, "stage": 1, "entry": 1, "scheduled_at": "2026-06-01T08:00:00.000Z"},
            {"id": 2, "stage": 1, "entry": 2, "scheduled_at": "2026-06-01T08:01:30.250Z"},
        ],
    }


@pytest.fixture
async def db(pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """``pg`` with the Directus tables bootstrapped in a fresh schema of its own."""
    name = f"ref_{uuid.uuid4().hex[:10]}"
    await pg.execute(f'CREATE SCHEMA "{name}"')
    await pg.execute(f'SET search_path TO "{name}"')
    await bootstrap(pg)
    try:
        yield pg
    finally:
        await pg.execute("RESET search_path")
        await pg.execute(f'DROP SCHEMA "{name}" CASCADE')


async def _sql(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def db_url(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """PROCESSOR_DATABASE_URL on a fresh bootstrapped schema, for CLI tests (no loop running)."""
    name = f"ref_{uuid.uuid4().hex[:10]}"
    url = f"{database_url}?{urlencode({'search_path': name})}"
    asyncio.run(_sql(database_url, f'CREATE SCHEMA "{name}"'))

    async def setup() -> None:
        conn = await asyncpg.connect(url)
        try:
            await bootstrap(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    monkeypatch.setenv("PROCESSOR_DATABASE_URL", url)
    try:
        yield url
    finally:
        asyncio.run(_sql(database_url, f'DROP SCHEMA "{name}" CASCADE'))


# --- course file ---------------------------------------------------------------------------


async def test_course_file_round_trips_through_import_and_export_unchanged(
    db: asyncpg.Connection,
) -> None:
    original = dump_course(canonical_course())
    summary = await import_course(db, parse_course(orjson.loads(original)))
    assert (summary.stages, summary.geofences, summary.entries, summary.start_times) == (2, 5, 2, 2)
    assert summary.devices_created == 2
    assert dump_course(await export_course(db, summary.event_id)) == original


async def test_import_export_import_export_is_byte_identical_and_idempotent(
    db: asyncpg.Connection,
) -> None:
    """A hand-written file: no ids, references by name and number, times in ms and offsets."""
    hand = copy.deepcopy(canonical_course())
    for item in [hand["event"], *hand["stages"], *hand["entries"], *hand["start_times"]]:
        item.pop("id")
    for item in hand["geofences"]["features"]:
        item["properties"].pop("id")
        if item["properties"]["stage"] == 1:
            item["properties"]["stage"] = "SS1 Kumrovec"
    for item in hand["start_times"]:
        item["stage"] = "SS1 Kumrovec"
        item["entry_number"] = {1: 7, 2: 12}[item.pop("entry")]
    hand["start_times"][0]["scheduled_at"] = 1780300800000
    hand["stages"][0]["opens_at"] = "2026-06-01T10:00:00+02:00"

    first = await import_course(db, parse_course(hand))
    exported = dump_course(await export_course(db, first.event_id))
    second = await import_course(db, parse_course(orjson.loads(exported)))
    assert second.event_id == first.event_id
    assert second.devices_created == 0
    assert dump_course(await export_course(db, second.event_id)) == exported
    assert exported == dump_course(canonical_course())
    assert await db.fetchval("SELECT count(*) FROM geofences") == 5


async def test_reimport_updates_rows_in_place_by_natural_keys(db: asyncpg.Connection) -> None:
    course = canonical_course()
    await import_course(db, parse_course(course))
    course["stages"][0]["closes_at"] = "2026-06-01T13:00:00.000Z"
    course["entries"][0]["imei"] = "356307042441039"
    course["geofences"]["features"][1]["properties"]["radius_m"] = 120
    await import_course(db, parse_course(course))
    exported = await export_course(db, 1)
    assert exported["stages"][0]["closes_at"] == "2026-06-01T13:00:00.000Z"
    assert exported["entries"][0]["imei"] == "356307042441039"
    assert exported["geofences"]["features"][1]["properties"]["radius_m"] == 120.0
    assert await db.fetchval("SELECT count(*) FROM stages") == 2
    assert await db.fetchval("SELECT count(*) FROM devices") == 3


async def test_export_loads_in_the_domain_model(db: asyncpg.Connection) -> None:
    model = pytest.importorskip("processor.domain.model")
    summary = await import_course(db, parse_course(canonical_course()))
    course = model.Course.from_dict(await export_course(db, summary.event_id))
    assert [e.number for e in course.entries] == [7, 12]
    assert len(course.geofences) == 5


def test_cli_course_import_then_export_writes_the_same_file(db_url: str, tmp_path: Path) -> None:
    source = tmp_path / "course.json"
    source.write_bytes(dump_course(canonical_course()))
    runner = CliRunner()
    result = runner.invoke(course_cli, ["import", str(source)])
    assert result.exit_code == 0, result.output
    assert (
        "event 1: 2 stages, 5 geofences, 2 entries (2 new devices), 2 start times" in result.output
    )
    target = tmp_path / "export.json"
    result = runner.invoke(course_cli, ["export", "--event", "1", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b'{"event": {"name": "x"},\n  "stages": [}', ":2:14: invalid JSON"),
        (b'{"event": {"name": "x"}, "stages": [{"kind": "special"}]}', "stages[0].name"),
        (
            b'{"event": {"name": "x"}, "stages": [{"name": "S"}],'
            b' "start_times": [{"stage": "T", "entry": 1, "scheduled_at": 0}]}',
            "start_times[0].stage: no stage with id or name 'T'",
        ),
    ],
)
def test_cli_course_import_bad_file_exits_2_naming_file_and_place(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "course.json"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(course_cli, ["import", str(path)])
    assert result.exit_code == 2
    assert str(path) in result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_course_export_unknown_event_exits_2(db_url: str) -> None:
    result = CliRunner().invoke(course_cli, ["export", "--event", "999"])
    assert result.exit_code == 2
    assert "no event with id 999" in result.output


# --- devices and IO mapping seeds ----------------------------------------------------------


def test_cli_devices_import_upserts_by_imei(db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(devices_cli, ["seed-mappings"]).exit_code == 0
    path = tmp_path / "devices.csv"
    path.write_text(f"imei,model,label\n{IMEI_A},FMB920,Car 7\n{IMEI_B},,spare\n")
    assert runner.invoke(devices_cli, ["import", str(path)]).output == "2 devices imported\n"
    path.write_text(f"imei,model,label\n{IMEI_A},FMC130,Car 7b\n")
    assert runner.invoke(devices_cli, ["import", str(path)]).exit_code == 0

    async def rows() -> list[tuple[str, str | None, str | None]]:
        conn = await asyncpg.connect(db_url)
        try:
            found = await conn.fetch(
                "SELECT d.imei, m.model, d.label FROM devices d"
                " LEFT JOIN device_models m ON m.id = d.device_model ORDER BY d.imei"
            )
            return [tuple(row) for row in found]
        finally:
            await conn.close()

    assert asyncio.run(rows()) == [(IMEI_A, "FMC130", "Car 7b"), (IMEI_B, None, "spare")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("imei,label\n1,a\n", ":1: header lacks column(s) model"),
        (f"imei,model,label\n{IMEI_A},FMB920,a\n12345,FMB920,b\n", ":3: imei must be 15 digits"),
        (f"imei,model,label\n{IMEI_A},FMB920\n", ":2: wrong number of columns"),
        (
            f"imei,model,label\n{IMEI_A},FMB920,a\n{IMEI_A},FMB920,a\n",
            ":3: imei 356307042441013 repeats",
        ),
    ],
)
def test_cli_devices_import_bad_row_exits_2_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(text)
    result = CliRunner().invoke(devices_cli, ["import", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}{message}" in result.output
    assert "Traceback" not in result.output


def test_cli_devices_import_unknown_model_exits_2_naming_the_line(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(f"imei,model,label\n{IMEI_A},FMB920,a\n{IMEI_B},FMB9200,b\n")
    assert CliRunner().invoke(devices_cli, ["seed-mappings"]).exit_code == 0
    result = CliRunner().invoke(devices_cli, ["import", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}:3: unknown model 'FMB9200' (known: FMB920, FMC130)" in result.output


async def test_seeding_adds_both_models_once_and_keeps_organiser_edits(
    db: asyncpg.Connection,
) -> None:
    elements = read_io_csv()
    assert await seed_io_mappings(db, elements) == 2 * len(elements)
    await db.execute("UPDATE io_mappings SET name = 'ign' WHERE io_id = 239")
    assert await seed_io_mappings(db, elements) == 0
    assert await db.fetchval("SELECT count(*) FROM io_mappings WHERE name = 'ign'") == 2
    values = await db.fetchval(
        'SELECT i."values"::text FROM io_mappings i JOIN device_models m'
        " ON m.id = i.device_model WHERE m.model = 'FMC130' AND i.io_id = 72"
    )
    assert orjson.loads(values)["3000"] == "not_connected"


# --- mapping cache -------------------------------------------------------------------------


def record(device_id: int, ts: int, io: dict[int, int | bytes]) -> Record:
    return Record(
        codec=142,
        ts=ts,
        received_at=ts,
        priority=0,
        lat=45.8,
        lon=15.9,
        alt=120,
        angle=0,
        sat=9,
        speed=50,
        event_io=0,
        io=io,
        imei=str(device_id),
        device_id=device_id,
    )


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def seeded_cache(db: asyncpg.Connection, clock: ManualClock) -> MappingCache:
    await seed_io_mappings(db, read_io_csv())
    await db.execute(
        "INSERT INTO devices (imei, device_model) SELECT $1, id FROM device_models"
        " WHERE model = 'FMC130'",
        IMEI_A,
    )
    cache = MappingCache(default_model="FMB920", reload_s=5.0, clock=clock)
    await cache.load(db)
    return cache


async def test_mapping_reloads_after_an_io_mappings_change_without_restart(
    db: asyncpg.Connection,
) -> None:
    clock = ManualClock()
    cache = await seeded_cache(db, clock)
    device = int(IMEI_A)
    rows = cache.rows([record(device, 1000, {66: 12850, 17: 65535})])
    assert orjson.loads(rows[0][2]) == {"external_voltage": 12.85, "axis_x": -1}
    version = rows[0][3]

    await db.execute(
        "UPDATE io_mappings SET name = 'supply_v', multiplier = 0.01 WHERE io_id = 66"
        " AND device_model = (SELECT id FROM device_models WHERE model = 'FMC130')"
    )
    clock.now = 1.0
    assert await cache.refresh(db) is False  # not yet due: no query, old mapping
    clock.now = 6.0
    assert await cache.refresh(db) is True
    rows = cache.rows([record(device, 2000, {66: 12850, 17: 65535})])
    assert orjson.loads(rows[0][2]) == {"supply_v": 128.5, "axis_x": -1}
    assert rows[0][3] != version
    clock.now = 12.0
    assert await cache.refresh(db) is False  # unchanged tables: no reload


async def test_unknown_device_uses_default_model_counted_and_logged_once(
    db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = await seeded_cache(db, ManualClock())
    before = REGISTRY.get_sample_value("processor_attributes_unknown_devices_total") or 0.0
    before_records = (
        REGISTRY.get_sample_value("processor_attributes_unknown_device_records_total") or 0.0
    )
    records = [record(IMEI_UNKNOWN, ts, {239: 1, 9999: 5}) for ts in (1000, 2000, 3000)]
    rows = cache.rows(records[:2]) + cache.rows(records[2:])
    assert [orjson.loads(row[2]) for row in rows] == [{"ignition": "on", "9999": 5}] * 3
    assert {row[3] for row in rows} == {cache.mapping("FMB920").version}
    assert REGISTRY.get_sample_value("processor_attributes_unknown_devices_total") == before + 1
    assert (
        REGISTRY.get_sample_value("processor_attributes_unknown_device_records_total")
        == before_records + 3
    )
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count(str(IMEI_UNKNOWN)) == 1


async def test_a_device_registered_later_is_picked_up_on_reload(db: asyncpg.Connection) -> None:
    clock = ManualClock()
    cache = await seeded_cache(db, clock)
    assert cache.model_for(int(IMEI_B)) == "FMB920"
    await db.execute(
        "INSERT INTO devices (imei, device_model) SELECT $1, id FROM device_models"
        " WHERE model = 'FMC130'",
        IMEI_B,
    )
    clock.now = 10.0
    assert await cache.refresh(db) is True
    assert cache.model_for(int(IMEI_B)) == "FMC130"
