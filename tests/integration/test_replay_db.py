"""``processor replay --event``: the stored results against a replay of the stored positions.

A simulated race (course file and stream entries from ``processor simulate``) is imported
into a real database; the command runs through click, its output and exit code are checked,
and the rows it writes are compared with the domain evaluated directly. Positions must
come out byte-identical.
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result

from processor.adapters import domain_store
from processor.adapters.positions_store import PositionsStore, init_connection
from processor.adapters.reference import export_course, import_course, parse_course
from processor.cli import cli
from processor.core.contract import decode_entry
from processor.core.records import Record
from processor.domain.engine import evaluate
from processor.settings import Settings

pytestmark = pytest.mark.integration

PROCESSOR = str(Path(sys.executable).with_name("processor"))
NOW = "2026-05-01T12:00:00Z"
NOW_MS = 1_777_636_800_000
RESULT_TABLES = ("timing_records", "penalties", "stage_results", "anomalies")
SPECS = {
    "timing_records": domain_store.TIMING,
    "penalties": domain_store.PENALTIES,
    "stage_results": domain_store.RESULTS,
    "anomalies": domain_store.ANOMALIES,
}
POSITIONS_MD5 = "SELECT md5(string_agg(t::text, '' ORDER BY device_id, ts)) FROM positions t"
SIM = ["--seed", "7", "--start", "2026-05-01T09:00:00Z", "--vehicles", "6", "--length-km", "10"]


# --- the race ----------------------------------------------------------------------------------


def _simulate(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    done = subprocess.run(
        [PROCESSOR, "simulate", *SIM, *args], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def _with_liaison(course: dict[str, Any]) -> dict[str, Any]:
    """The simulated course plus a liaison stage "L1" over the same window (start and
    finish gates copied from SS1), so that --stage has something to leave out."""
    out = copy.deepcopy(course)
    ss1 = out["stages"][0]
    out["stages"].append(
        {**ss1, "name": "L1", "sequence": 2, "kind": "liaison", "start_mode": "gate"}
    )
    gates = [
        f for f in out["geofences"]["features"] if f["properties"]["kind"] in ("start", "finish")
    ]
    for gate in gates:
        twin = copy.deepcopy(gate)
        twin["properties"]["stage"] = "L1"
        twin.pop("id", None)
        twin["properties"].pop("id", None)
        out["geofences"]["features"].append(twin)
    return out


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with course.json (no ids, with the liaison) and entries.jsonl."""
    root = tmp_path_factory.mktemp("replay_db")
    _simulate("--prepare-only", "--course-out", str(root / "simulated.json"))
    _simulate(
        "--course",
        str(root / "simulated.json"),
        "--out",
        str(root / "entries.jsonl"),
        "--positions-csv",
        str(root / "positions.csv"),
    )
    course = _with_liaison(orjson.loads((root / "simulated.json").read_bytes()))
    (root / "course.json").write_bytes(orjson.dumps(course))
    return root


def _records(path: Path) -> list[Record]:
    out = []
    for index, line in enumerate(path.read_bytes().splitlines()):
        decoded = decode_entry(f"1-{index}", orjson.loads(line))
        assert isinstance(decoded, Record), decoded
        out.append(decoded)
    return out


async def _prepare(conn: asyncpg.Connection, settings: Settings, race: Path) -> int:
    """Empty result tables, the course imported, the positions stored; the event id."""
    for table in RESULT_TABLES:
        await conn.execute(f"DELETE FROM {table}")
    course = parse_course(orjson.loads(race.joinpath("course.json").read_bytes()))
    summary = await import_course(conn, course)
    pool = await asyncpg.create_pool(
        settings.database_dsn(), init=init_connection, min_size=1, max_size=2
    )
    try:
        positions = PositionsStore(pool, settings)
        await positions.detect_layout()
        assert await positions.write(_records(race / "entries.jsonl"))
    finally:
        await pool.close()
    return summary.event_id


# --- helpers -------------------------------------------------------------------------------------


async def replay(settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    """``processor replay ARGS`` through click, in a thread (the command runs its own loop)."""
    monkeypatch.setenv("PROCESSOR_DATABASE_URL", settings.database_dsn())
    return await asyncio.to_thread(CliRunner().invoke, cli, ["replay", *args])


def _key(spec: domain_store.Table, row: dict[str, Any]) -> tuple[bytes, ...]:
    values = []
    for column in spec.columns:
        value = row[column]
        if column in spec.json_columns and isinstance(value, bytes | str):
            value = orjson.loads(value)
        if isinstance(value, Decimal):  # numeric(p, s) prints its scale: 39.70 is 39.7
            value = float(value)
        values.append(orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str))
    return tuple(values)


async def stored_rows(conn: asyncpg.Connection) -> dict[str, set[tuple[bytes, ...]]]:
    return {
        table: {_key(SPECS[table], dict(r)) for r in await conn.fetch(f"SELECT * FROM {table}")}
        for table in RESULT_TABLES
    }


async def evaluated_rows(conn: asyncpg.Connection, event_id: int) -> dict[str, set[Any]]:
    course = await domain_store.load_course(conn, event_id)
    positions = await domain_store.load_positions(conn, course)
    result = evaluate(course, positions, NOW_MS, source="replay")
    converters: dict[str, tuple[Sequence[Any], Any]] = {
        "timing_records": (result.timing_records, domain_store.timing_row),
        "penalties": (result.penalties, domain_store.penalty_row),
        "stage_results": (result.stage_results, domain_store.result_row),
        "anomalies": (result.anomalies, domain_store.anomaly_row),
    }
    return {
        table: {_key(SPECS[table], convert(row)) for row in rows}
        for table, (rows, convert) in converters.items()
    }


def _summary(result: Result) -> dict[str, Any]:
    assert result.exit_code in (0, 1), result.output
    body: dict[str, Any] = orjson.loads(result.stdout)
    return body


# --- tests ---------------------------------------------------------------------------------------


async def test_nothing_stored_then_write_then_no_difference(
    clean_db: asyncpg.Connection,
    settings: Settings,
    race: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event_id = await _prepare(clean_db, settings, race)
    before_md5 = await clean_db.fetchval(POSITIONS_MD5)
    expected = await evaluated_rows(clean_db, event_id)
    assert expected["timing_records"], "the race produced timing records"
    assert expected["anomalies"], "the race produced anomalies"

    result = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW)
    assert result.exit_code == 1, result.output
    for table in RESULT_TABLES:
        assert f"{table}: {len(expected[table])} created, 0 updated, 0 deleted" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("not written (use --write)")

    body = _summary(
        await replay(
            settings, monkeypatch, "--event", str(event_id), "--now", NOW, "--format", "json"
        )
    )
    assert body["summary"] == {
        "created": sum(len(rows) for rows in expected.values()),
        "updated": 0,
        "deleted": 0,
    }
    assert {c["action"] for rows in body["changes"].values() for c in rows} == {"created"}
    assert await stored_rows(clean_db) == {table: set() for table in RESULT_TABLES}

    result = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW, "--write")
    assert result.exit_code == 0, result.output
    assert "written (source = replay)" in result.stdout
    assert await stored_rows(clean_db) == expected
    sources = await clean_db.fetch("SELECT DISTINCT source FROM timing_records")
    assert [r["source"] for r in sources] == ["replay"]
    assert await clean_db.fetchval(
        "SELECT count(*) FROM processor.outbox WHERE type = 'timing_record.created'"
    ) >= len(expected["timing_records"])
    assert await clean_db.fetchval(POSITIONS_MD5) == before_md5

    result = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [result.stdout.splitlines()[-1]]
    assert result.stdout.rstrip().endswith(": no difference")

    # A range or a stage reads whole stage windows: their rows are exact, nothing differs.
    window = ["--from", "2026-05-01T09:05:00Z", "--to", "2026-05-01T09:06:00Z"]
    ss1 = await clean_db.fetchval(
        "SELECT id FROM stages WHERE event = $1 AND name = 'SS1'", event_id
    )
    for narrowed in (window, ["--stage", str(ss1)]):
        result = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW,
                              *narrowed)  # fmt: skip
        assert result.exit_code == 0, (narrowed, result.output)
    assert await clean_db.fetchval(POSITIONS_MD5) == before_md5


async def test_course_file_layout_is_compared_never_written(
    clean_db: asyncpg.Connection,
    settings: Settings,
    race: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    event_id = await _prepare(clean_db, settings, race)
    written = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW, "--write")
    assert written.exit_code == 0, written.output
    stored = await stored_rows(clean_db)

    # The course file as simulated (no ids at all) maps onto the event by names: no change.
    same = await replay(
        settings, monkeypatch, "--event", str(event_id), "--now", NOW,
        "--course", str(race / "course.json"),
    )  # fmt: skip
    assert same.exit_code == 0, same.output
    assert "no difference" in same.stdout

    # Waypoints shrunk to 1 m: validations disappear, missed-waypoint penalties appear.
    layout = await export_course(clean_db, event_id)
    for feature in layout["geofences"]["features"]:
        feature["id"] = feature["properties"]["id"] = 10_000 + feature["properties"]["id"]
        if feature["properties"]["kind"] == "waypoint":
            feature["properties"]["radius_m"] = 1.0
    path = tmp_path / "tight.json"
    path.write_bytes(orjson.dumps(layout))
    args = ["--event", str(event_id), "--now", NOW, "--course", str(path)]
    result = await replay(settings, monkeypatch, *args, "--format", "json")
    body = _summary(result)
    assert result.exit_code == 1
    created = body["changes"]["penalties"]
    assert created
    assert {c["row"]["reason"] for c in created} == {"missed_waypoint"}
    assert {c["action"] for c in body["changes"]["timing_records"]} == {"deleted"}
    updated = [c for c in body["changes"]["stage_results"] if c["action"] == "updated"]
    assert updated
    assert all("penalty_ms" in c["changed"] for c in updated)
    ids = {g["properties"]["id"] - 10_000 for g in layout["geofences"]["features"]}
    assert {c["row"]["geofence"] for c in created} <= ids, "mapped to the stored geofences"

    text = await replay(settings, monkeypatch, *args)
    assert text.exit_code == 1
    assert "penalty_ms 0 → " in text.stdout

    refused = await replay(settings, monkeypatch, *args, "--write")
    assert refused.exit_code == 2
    assert "--write with --course refused" in refused.output
    assert "Traceback" not in refused.output
    assert await stored_rows(clean_db) == stored


async def test_entry_and_stage_restrict_the_units(
    clean_db: asyncpg.Connection,
    settings: Settings,
    race: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event_id = await _prepare(clean_db, settings, race)
    entry_2 = await clean_db.fetchval(
        "SELECT id FROM entries WHERE event = $1 AND number = 2", event_id
    )
    liaison = await clean_db.fetchval(
        "SELECT id FROM stages WHERE event = $1 AND name = 'L1'", event_id
    )
    base = ["--event", str(event_id), "--now", NOW, "--format", "json"]

    body = _summary(await replay(settings, monkeypatch, *base, "--entry", "2"))
    rows = [c["row"] for changes in body["changes"].values() for c in changes]
    assert rows
    assert {r["entry"] for r in rows} == {entry_2}
    assert body["ranks_compared"] is False

    body = _summary(await replay(settings, monkeypatch, *base, "--stage", str(liaison)))
    staged = [c["row"] for t in ("timing_records", "penalties", "stage_results")
              for c in body["changes"][t]]  # fmt: skip
    assert staged
    assert {r["stage"] for r in staged} == {liaison}
    assert body["units"] == 6

    # One entry written: the full replay then differs only in the other entries (and in
    # the ranks, which the entry's write computed from the stored rows alone).
    one = await replay(settings, monkeypatch, "--event", str(event_id), "--now", NOW,
                       "--entry", "2", "--write")  # fmt: skip
    assert one.exit_code == 0, one.output
    body = _summary(await replay(settings, monkeypatch, *base))
    created = [c["row"] for changes in body["changes"].values() for c in changes
               if c["action"] == "created"]  # fmt: skip
    assert created
    assert entry_2 not in {r["entry"] for r in created}
    assert all(
        set(c["changed"]) <= {"rank", "class_rank", "gap_ms"}
        for c in body["changes"]["stage_results"]
        if c["action"] == "updated"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--event", "999999"], "no event with id 999999"),
        (["--event", "x"], "--event: not an id"),
        (["--event", "{event}", "--stage", "999999"], "not a stage of this event"),
        (["--event", "{event}", "--entry", "999"], "no such entry number"),
        (["--event", "{event}", "--from", "yesterday"], "not an ISO 8601 time"),
        (["--event", "{event}", "--from", NOW, "--to", "2026-05-01T09:00:00Z"], "--from is after"),
        (["--event", "{event}", "--course", "/nonexistent.json"], "cannot read course file"),
    ],
)
async def test_bad_input_exits_2_without_traceback(
    clean_db: asyncpg.Connection,
    settings: Settings,
    race: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    course = parse_course(orjson.loads(race.joinpath("course.json").read_bytes()))
    event_id = (await import_course(clean_db, course)).event_id
    result = await replay(settings, monkeypatch, *[a.format(event=event_id) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
