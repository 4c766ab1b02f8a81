"""Course files, positions.csv, JSON output and the ``processor replay`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from processor.domain.engine import evaluate
from processor.domain.model import Course, CourseError, Rules
from processor.domain.output import to_json, to_table
from processor.domain.positions_csv import PositionsError, parse_positions
from processor.domain.timeutil import format_ms
from processor.tools.replay_cli import replay
from tests.domain.helpers import IMEI, STANDARD, T0, course, track

HEADER = "imei,ts,lat,lon,alt,angle,sat,speed,priority,event_io,received_at,io\n"


def _csv(positions) -> str:
    lines = [HEADER]
    for p in positions:
        lines.append(
            f"{p.imei},{p.ts},{p.lat!r},{p.lon!r},{p.alt},{p.angle},{p.sat},{p.speed},"
            f'{p.priority},{p.event_io},{p.received_at},"{{}}"\n'
        )
    return "".join(lines)


def test_rules_default_to_domain_values_and_merge_waypoint_types() -> None:
    rules = Rules.from_dict({"rearm_s": 10, "missed_waypoint_penalty_s": {"WPV": 100}})
    assert (rules.rearm_s, rules.max_speed_kmh, rules.offline_after_s) == (10, 300, 120)
    assert rules.waypoint_penalty_s("WPV") == 100
    assert rules.waypoint_penalty_s("WPE") == 600
    assert rules.waypoint_penalty_s(None) == 900
    assert [b.over_kmh for b in rules.speed_penalties] == [0, 20, 40]


def test_course_round_trips_and_generates_ids_deterministically() -> None:
    data = course(STANDARD).to_dict()
    for item in data["geofences"]["features"]:
        del item["id"]
        del item["properties"]["id"]
    first = Course.from_dict(data)
    assert [g.id for g in first.geofences] == [1, 2]
    assert Course.from_dict(first.to_dict()) == first


def test_start_times_refer_to_entries_by_number_and_stages_by_name() -> None:
    data = course(STANDARD).to_dict()
    data["start_times"] = [{"stage": "SS1", "entry_number": 101, "scheduled_at": T0}]
    parsed = Course.from_dict(data)
    assert parsed.start_times[0].entry == 1
    assert parsed.start_times[0].stage == 1


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["stages"][0].update(kind="rally"), "stages[0].kind"),
        (lambda d: d["event"]["rules"].update(rearm_s="x"), "event.rules.rearm_s"),
        (
            lambda d: d["geofences"]["features"][0].update(
                geometry={"type": "Point", "coordinates": [1, 2]}
            ),
            "geofences.features[0].geometry",
        ),
        (lambda d: d["entries"][0].update(number="x"), "entries[0].number"),
        (
            lambda d: d["geofences"]["features"].append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[14, 45], [14.1, 45], [14, 45.1]],
                    },
                    "properties": {"kind": "forbidden_zone", "name": "Flat", "stage": 1},
                }
            ),
            "geofences.features[2].geometry.coordinates",
        ),
        (
            lambda d: d["geofences"]["features"].append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[14, 45], [14.1, 45], [14, 45]]],
                    },
                    "properties": {"kind": "forbidden_zone", "name": "Thin", "stage": 1},
                }
            ),
            "geofences.features[2].geometry",
        ),
        (lambda d: d["stages"][0].update(opens_at="yesterday"), "stages[0].opens_at"),
        (
            lambda d: d["geofences"]["features"][0]["properties"].update(stage=99),
            "geofences.features[0].stage",
        ),
    ],
)
def test_invalid_course_names_the_place(mutate, where: str) -> None:
    data = json.loads(json.dumps(course(STANDARD).to_dict()))
    mutate(data)
    with pytest.raises(CourseError, match="^" + re.escape(where)):
        Course.from_dict(data)


def test_positions_csv_accepts_ms_iso_missing_received_at_and_sentinels() -> None:
    text = HEADER + (
        f"{IMEI},2024-06-01T12:00:00.250Z,45.1,14.2,-12,90,7,55,2,247,,"
        '"{""113"": 15, ""16"": {""$bigint"": ""18446744073709551615""}, '
        '""256"": {""$bytes"": ""AAE=""}}"\n'
        f"{IMEI},{T0},45.1,14.2,0,0,7,55,0,0,{T0 + 10},\n"
    )
    first, second = parse_positions(text.splitlines(keepends=True))
    assert first.ts == first.received_at == T0 + 250
    assert (first.alt, first.priority, first.event_io) == (-12, 2, 247)
    assert first.io == {113: 15, 16: 2**64 - 1, 256: b"\x00\x01"}
    assert (second.ts, second.received_at, second.io) == (T0, T0 + 10, {})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (f"{IMEI},yesterday,45,14,0,0,7,55,0,0,,", "line 2, column 'ts'"),
        (f"{IMEI},{T0},95,14,0,0,7,55,0,0,,", "line 2, column 'lat'"),
        (f"{IMEI},{T0},45,14,0,0,x,55,0,0,,", "line 2, column 'sat'"),
        (f'{IMEI},{T0},45,14,0,0,7,55,0,0,,"{{""1"": -1}}"', "line 2, column 'io'"),
        (f'{IMEI},{T0},45,14,0,0,7,55,0,0,,"{{""1"": {{""$bigint"": ""x""}}}}"', "column 'io'"),
        (f"{IMEI},{T0},45,14", "line 2: 4 fields"),
        (f"{IMEI},{T0},nan,14,0,0,7,55,0,0,,", "line 2, column 'lat'"),
        (f"{IMEI},{T0},45,14,0,0,7,55,0,0,999999999999999999,", "column 'received_at'"),
        (f",{T0},45,14,0,0,7,55,0,0,,", "line 2, column 'imei'"),
        (f'{IMEI},{T0},45,14,0,0,7,55,0,0,,"{{""70000"": 1}}"', "IO id '70000'"),
    ],
)
def test_positions_csv_errors_name_line_and_column(row: str, message: str) -> None:
    with pytest.raises(PositionsError, match=message):
        parse_positions([HEADER, row + "\n"])


def test_positions_csv_fast_and_careful_paths_agree() -> None:
    plain = f"{IMEI},{T0},45.5,14.5,3,4,5,6,0,0,{T0 + 9},\n"
    spaced = f" {IMEI} , {T0} ,45.5,14.5,3,4,5,6,0,0, {T0 + 9} ,{{}}\n"
    assert parse_positions([HEADER, plain]) == parse_positions([HEADER, spaced])


def test_positions_csv_rejects_unknown_or_missing_header_columns() -> None:
    with pytest.raises(PositionsError, match="line 1, column 'colour'"):
        parse_positions(["imei,ts,lat,lon,colour\n"])
    with pytest.raises(PositionsError, match="line 1, column 'lon'"):
        parse_positions(["imei,ts,lat\n"])


def test_json_output_is_sorted_iso_and_names_entries_and_geofences() -> None:
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000)
    data = orjson.loads(to_json(evaluate(course(STANDARD), fixes)))
    assert list(data) == ["timing_records", "penalties", "stage_results", "anomalies"]
    start, finish = data["timing_records"]
    assert (start["entry"], start["geofence"], start["ts"]) == (101, "Start", format_ms(T0 + 500))
    assert finish["ts"] == "2024-06-01T12:01:40.500Z"
    assert data["stage_results"][0]["elapsed_ms"] == 100_000
    assert "Stage results" in to_table(evaluate(course(STANDARD), fixes))


def _files(tmp_path: Path, positions_text: str, course_data=None) -> list[str]:
    course_path = tmp_path / "course.json"
    course_path.write_bytes(orjson.dumps(course_data or course(STANDARD).to_dict()))
    positions_path = tmp_path / "positions.csv"
    positions_path.write_text(positions_text)
    return ["--course", str(course_path), "--positions", str(positions_path)]


def test_replay_command_prints_the_same_bytes_for_the_same_input(tmp_path: Path) -> None:
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000)
    args = _files(tmp_path, _csv(fixes))
    runner = CliRunner()
    first = runner.invoke(replay, [*args, "--format", "json"])
    (tmp_path / "shuffled").mkdir()
    shuffled = _files(tmp_path / "shuffled", _csv(list(reversed(fixes)) + fixes[:5]))
    second = runner.invoke(replay, [*shuffled, "--format", "json"])
    assert first.exit_code == 0, first.output
    assert first.stdout_bytes == second.stdout_bytes
    assert first.stdout_bytes == to_json(evaluate(course(STANDARD), fixes))
    table = runner.invoke(replay, [*args, "--format", "table"])
    assert table.exit_code == 0
    assert "finished" in table.output


@pytest.mark.parametrize(
    ("positions", "course_data", "message"),
    [
        (HEADER + f"{IMEI},{T0},45,14,0,0,x,55,0,0,,\n", None, "positions.csv: line 2"),
        (HEADER, {"stages": "x"}, "course.json: stages: must be a list"),
    ],
)
def test_replay_command_bad_input_exits_2_with_a_message(
    tmp_path: Path, positions: str, course_data, message: str
) -> None:
    result = CliRunner().invoke(replay, _files(tmp_path, positions, course_data))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_replay_command_missing_file_and_database_options(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(replay, ["--course", str(tmp_path / "no.json"), "--positions", "x"])
    assert missing.exit_code == 2
    assert "cannot read course file" in missing.output
    assert runner.invoke(replay, ["--stage", "1"]).exit_code == 2
    assert "--stage needs --event" in runner.invoke(replay, ["--stage", "1"]).output


def test_replay_now_closes_stages_and_output_goes_to_a_file(tmp_path: Path) -> None:
    fixes = track([-5.0 + 10 * i for i in range(50)], 1000)  # started, never finished
    out = tmp_path / "result.json"
    args = [*_files(tmp_path, _csv(fixes)), "--now", "2024-06-01T18:00:00Z", "-o", str(out)]
    result = CliRunner().invoke(replay, args)
    assert result.exit_code == 0, result.output
    assert orjson.loads(out.read_bytes())["stage_results"][0]["status"] == "dnf"
    bad = CliRunner().invoke(replay, [*_files(tmp_path, _csv(fixes)), "--now", "soon"])
    assert bad.exit_code == 2
    assert "--now" in bad.output
