"""The race simulator: determinism, contract conformance, fault proportions, course file.

Most tests share two small simulated races (module fixtures) so the file stays fast: a
"default" race with the default fault rates and a "busy" one with raised per-record rates,
big enough to check proportions statistically.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner

from processor.core.contract import decode_entry
from processor.core.records import Record, Rejection
from processor.tools.sim_course import load_course, parse_iso_ms
from processor.tools.sim_geo import point_in_ring
from processor.tools.simulate import (
    Entry,
    FaultRates,
    FileSink,
    PositionsCsvSink,
    RedisSink,
    SimConfig,
    Simulation,
    run,
    write_devices,
)
from processor.tools.simulate_cli import simulate

START = "2026-06-01T08:00:00Z"
START_MS = parse_iso_ms(START)
PLAUSIBLE_FROM_MS = parse_iso_ms("2010-01-01T00:00:00Z")


def entries_of(sim: Simulation) -> list[Entry]:
    return [e for _, batch in sim.batches() for e in batch]


def payloads(entries: list[Entry]) -> list[dict[str, Any]]:
    return [orjson.loads(e.payload) for e in entries]


@pytest.fixture(scope="module")
def default_race() -> tuple[Simulation, list[Entry]]:
    sim = Simulation(SimConfig(start_ms=START_MS, seed=11, vehicles=25, length_km=10))
    return sim, entries_of(sim)


BUSY_RATES = FaultRates(duplicate=0.05, no_fix=0.05, gap=0.05)


@pytest.fixture(scope="module")
def busy_race() -> tuple[Simulation, list[Entry]]:
    sim = Simulation(
        SimConfig(start_ms=START_MS, seed=5, vehicles=40, length_km=10, rates=BUSY_RATES)
    )
    return sim, entries_of(sim)


# -- determinism ------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_entries_and_positions() -> None:
    def render(seed: int) -> tuple[bytes, str]:
        sim = Simulation(SimConfig(start_ms=START_MS, seed=seed, vehicles=6, length_km=10))
        lines, rows = io.BytesIO(), io.StringIO()
        run(sim, [FileSink(lines), PositionsCsvSink(rows)], speed=None)
        return lines.getvalue(), rows.getvalue()

    first, second = render(3), render(3)
    assert first == second
    assert len(first[0]) > 100_000
    assert render(4)[0] != first[0]


def test_cli_runs_are_byte_identical(tmp_path: Path) -> None:
    outputs = []
    for run_dir in ("a", "b"):
        out = tmp_path / run_dir
        out.mkdir()
        result = CliRunner().invoke(
            simulate,
            [
                "--seed", "9", "--vehicles", "5", "--length-km", "10", "--start", START,
                "--out", str(out / "entries.jsonl"),
                "--positions-csv", str(out / "positions.csv"),
                "--course-out", str(out / "course.json"),
                "--devices-out", str(out / "devices.csv"),
                "--summary", "json",
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    summary = orjson.loads(result.output)
    lines = outputs[0]["entries.jsonl"].splitlines()
    assert summary["entries"] == len(lines)
    assert len(outputs[0]["positions.csv"].splitlines()) == len(lines) + 1


def test_step_hands_out_exactly_what_was_received_by_then(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    _, expected = default_race
    sim = Simulation(SimConfig(start_ms=START_MS, seed=11, vehicles=25, length_km=10))
    got: list[Entry] = []
    until = START_MS
    while not sim.done:
        until += 7_300  # steps that do not fall on whole seconds
        batch = sim.step(until)
        assert all(e.received_at <= until for e in batch)
        got.extend(batch)
    assert got == expected


def test_accelerated_run_sleeps_the_simulated_time_divided_by_speed() -> None:
    sim = Simulation(
        SimConfig(start_ms=START_MS, seed=2, vehicles=2, length_km=10, rates=FaultRates())
    )
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    summary = run(sim, [], speed=20.0, monotonic=lambda: clock[0], sleep=sleep)
    simulated_s = (sim.clock_ms - START_MS) / 1000
    assert clock[0] == pytest.approx(simulated_s / 20, abs=0.1)
    assert summary.entries > 0


# -- contract ---------------------------------------------------------------------------


def test_every_entry_decodes_with_the_contract_decoder(
    default_race: tuple[Simulation, list[Entry]], busy_race: tuple[Simulation, list[Entry]]
) -> None:
    for _, entries in (default_race, busy_race):
        for n, e in enumerate(entries):
            fields = {
                k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in e.fields().items()
            }
            decoded = decode_entry(f"0-{n}", fields)
            assert not isinstance(decoded, Rejection), (decoded, e.payload)
            assert isinstance(decoded, Record)
            assert decoded.imei == e.imei


def test_records_carry_the_fmb920_io_set_with_sentinels(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    _, entries = default_race
    records = payloads(entries)
    required = {
        "239",
        "240",
        "80",
        "21",
        "69",
        "181",
        "182",
        "66",
        "67",
        "68",
        "16",
        "199",
        "113",
        "24",
        "11",
    }
    for p in records:
        assert required <= p["io"].keys()
        assert p["codec"] == 142
        assert set(p["io"]["11"]) == {"$bigint"}
        assert all(
            isinstance(v, int) and v >= 0 for k, v in p["io"].items() if k not in ("11", "256")
        )
    vins = [p["io"]["256"] for p in records if "256" in p["io"]]
    assert vins
    assert all(set(v) == {"$bytes"} for v in vins)


def test_file_lines_are_entries_with_payload_as_json_text() -> None:
    sim = Simulation(SimConfig(start_ms=START_MS, seed=1, vehicles=2, length_km=10))
    out = io.BytesIO()
    run(sim, [FileSink(out)], speed=None)
    for line in out.getvalue().splitlines():
        entry = orjson.loads(line)
        assert list(entry) == ["v", "imei", "payload"]
        assert entry["v"] == "1"
        assert isinstance(entry["payload"], str)
        assert orjson.loads(entry["payload"])["ts"] > 0


# -- faults -----------------------------------------------------------------------------


def _binomial_bound(n: int, p: float) -> float:
    """Four standard deviations of a Binomial(n, p) count: false alarm rate < 1e-4."""
    return 4 * math.sqrt(n * p * (1 - p))


def test_duplicates_appear_at_their_rate(busy_race: tuple[Simulation, list[Entry]]) -> None:
    sim, entries = busy_race
    keys = Counter((e.imei, orjson.loads(e.payload)["ts"]) for e in entries)
    unique = len(keys)
    duplicates = len(entries) - unique
    # Each delivery is resent independently with probability p: a binomial count.
    expected = BUSY_RATES.duplicate * unique
    assert abs(duplicates - expected) < _binomial_bound(unique, BUSY_RATES.duplicate)
    assert duplicates == sim.summary().counts["duplicates"]
    assert unique == sim.summary().records


def test_no_fix_records_appear_at_their_rate_and_look_like_no_fix(
    busy_race: tuple[Simulation, list[Entry]],
) -> None:
    sim, entries = busy_race
    unique = {(e.imei, p["ts"]): p for e, p in zip(entries, payloads(entries), strict=True)}
    no_fix = [p for p in unique.values() if p["sat"] == 0]
    n, rate = len(unique), BUSY_RATES.no_fix
    # No-fix records come in runs of 3..12 (mean 7.5, E[L²] = 64.5), so the count is a
    # compound sum: variance ≈ runs × E[L²] with runs ≈ n·rate/7.5. Four deviations of
    # that is about ±30 % here; an independent-records model would be too strict.
    runs = n * rate / 7.5
    assert abs(len(no_fix) - n * rate) < 4 * math.sqrt(runs * 64.5)
    assert len(no_fix) == sim.summary().counts["no_fix"]
    for p in no_fix:
        assert (p["speed"], p["angle"], p["io"]["69"]) == (0, 0, 2)
    rebooted = [p for p in no_fix if p["lat"] == 0 and p["lon"] == 0]
    assert 0 < len(rebooted) < len(no_fix) / 2


def test_gaps_are_uploaded_later_newest_first(busy_race: tuple[Simulation, list[Entry]]) -> None:
    sim, entries = busy_race
    by_device: dict[str, list[dict[str, Any]]] = {}
    for p, e in zip(payloads(entries), entries, strict=True):
        by_device.setdefault(e.imei, []).append(p)
    late_descending = 0
    for records in by_device.values():
        for older, newer in itertools.pairwise(records):
            # A backlog record follows a newer one, received seconds after it was logged.
            if newer["ts"] < older["ts"] and newer["received_at"] - newer["ts"] > 15_000:
                late_descending += 1
    assert sim.summary().counts["gaps"] > 0
    assert late_descending > sim.summary().counts["backlog"] / 2


def test_one_off_incidents_happen_to_the_planned_number_of_vehicles(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    sim, entries = default_race
    rates, n = FaultRates(), len(sim.vehicles)
    counts = sim.summary().counts
    for name in (
        "sos",
        "crash",
        "stopped",
        "low_battery",
        "speeding",
        "missed_waypoint",
        "dnf",
        "spike",
    ):
        assert counts[name] == math.ceil(getattr(rates, name) * n), name
    by_device: dict[str, list[dict[str, Any]]] = {}
    for p, e in zip(payloads(entries), entries, strict=True):
        by_device.setdefault(e.imei, []).append(p)
    sos = {i for i, ps in by_device.items() if any(p["priority"] == 2 for p in ps)}
    crash = {i for i, ps in by_device.items() if any(p["io"].get("247") == 1 for p in ps)}
    low = {i for i, ps in by_device.items() if any(p["io"]["113"] < 20 for p in ps)}
    clock = {
        i
        for i, ps in by_device.items()
        if any(p["ts"] < PLAUSIBLE_FROM_MS or p["ts"] > p["received_at"] + 300_000 for p in ps)
    }
    assert (len(sos), len(crash), len(low)) == (
        counts["sos"],
        counts["crash"],
        counts["low_battery"],
    )
    assert len(clock) == math.ceil(rates.bad_clock * n)


def test_speeding_vehicles_exceed_the_limit_and_others_do_not(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    sim, entries = default_race
    course = sim.course
    speeders = {v.imei for v in sim.vehicles if v.incidents.speeding_kmh is not None}
    over: set[str] = set()
    for e, p in zip(entries, payloads(entries), strict=True):
        if p["sat"] == 0:
            continue
        point = course.plane.to_xy(p["lat"], p["lon"])
        for zone in course.speed_zones():
            assert zone.limit_kmh is not None
            if p["speed"] > zone.limit_kmh and point_in_ring(point, zone.ring):
                over.add(e.imei)
    assert over == speeders


def test_no_faults_gives_a_clean_ordered_stream() -> None:
    zero = FaultRates(**{name: 0.0 for name in FaultRates.__dataclass_fields__})
    sim = Simulation(SimConfig(start_ms=START_MS, seed=8, vehicles=4, length_km=10, rates=zero))
    entries = entries_of(sim)
    last: dict[str, int] = {}
    for e, p in zip(entries, payloads(entries), strict=True):
        assert p["sat"] > 0
        assert p["priority"] in (0, 1)  # 1 only for the final ignition-off record
        assert p["ts"] > last.get(e.imei, 0)
        last[e.imei] = p["ts"]
    assert sim.summary().counts == {}


# -- course and devices -----------------------------------------------------------------


def test_course_file_has_every_geofence_kind_and_waypoint_type(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    sim, _ = default_race
    data = sim.course.to_file()
    features = data["geofences"]["features"]
    kinds = Counter(f["properties"]["kind"] for f in features)
    assert set(kinds) == {"start", "split", "finish", "waypoint", "speed_zone", "forbidden_zone"}
    assert kinds["start"] == kinds["finish"] == 1
    types = {
        f["properties"]["waypoint_type"] for f in features if f["properties"]["kind"] == "waypoint"
    }
    assert types == {"WPV", "WPM", "WPS", "WPE", "WPC"}
    geometry = {f["properties"]["kind"]: f["geometry"]["type"] for f in features}
    assert geometry == {
        "start": "LineString",
        "split": "LineString",
        "finish": "LineString",
        "waypoint": "Point",
        "speed_zone": "Polygon",
        "forbidden_zone": "Polygon",
    }
    assert [f["properties"]["sequence"] for f in features] == list(range(1, len(features) + 1))
    names = [f["properties"]["name"] for f in features]
    assert len(set(names)) == len(names)  # replay output refers to geofences by name
    assert len(data["entries"]) == len(data["start_times"]) == 25


def test_course_file_is_read_by_the_domain_parser(
    default_race: tuple[Simulation, list[Entry]],
) -> None:
    from processor.domain.model import Course as DomainCourse

    sim, _ = default_race
    parsed = DomainCourse.from_dict(orjson.loads(orjson.dumps(sim.course.to_file())))
    assert len(parsed.entries) == 25


def test_a_written_course_can_be_driven_again(default_race: tuple[Simulation, list[Entry]]) -> None:
    sim, _ = default_race
    course = load_course(orjson.loads(orjson.dumps(sim.course.to_file())))
    assert [e.imei for e in course.entries] == [e.imei for e in sim.course.entries]
    assert {g.kind for g in course.gates} == {"start", "split", "finish"}
    replayed = Simulation(SimConfig(start_ms=START_MS, seed=1, vehicles=1), course)
    assert {e.imei for e in entries_of(replayed)} == {e.imei for e in course.entries}


def test_entries_imeis_match_the_devices_csv(
    default_race: tuple[Simulation, list[Entry]], tmp_path: Path
) -> None:
    sim, entries = default_race
    path = tmp_path / "devices.csv"
    write_devices(sim.course, path)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["imei", "model", "label"]
    devices = {row["imei"] for row in rows}
    assert len(devices) == len(rows) == 25
    assert {e.imei for e in entries} == devices
    assert all(len(i) == 15 and i.isdigit() for i in devices)


# -- Redis ------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_writes_every_entry_to_the_redis_stream(stream_prefix: str, redis_url: str) -> None:
    stream = f"{stream_prefix}:records"
    result = CliRunner().invoke(
        simulate,
        [
            "--seed", "4", "--vehicles", "3", "--length-km", "10", "--start", START,
            "--rate", "max", "--redis-url", redis_url, "--stream", stream,
            "--batch-size", "500", "--summary", "json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream) == summary["entries"] > 1000
        first = client.xrange(stream, count=1)[0][1]
        assert set(first) == {b"v", b"imei", b"payload"}
        assert not isinstance(decode_entry("0-1", first), Rejection)
    finally:
        client.close()


@pytest.mark.integration
def test_redis_sink_stores_exactly_the_entries_in_order(stream_prefix: str, redis_url: str) -> None:
    sim = Simulation(SimConfig(start_ms=START_MS, seed=6, vehicles=3, length_km=10))
    entries = entries_of(sim)
    stream = f"{stream_prefix}:records"
    client = redis.Redis.from_url(redis_url)
    try:
        RedisSink(client, stream, batch_size=700).write(entries)
        stored = [fields for _, fields in client.xrange(stream)]
        expected = [
            {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in e.fields().items()}
            for e in entries
        ]
        assert stored == expected
    finally:
        client.close()


@pytest.mark.integration
def test_redis_sink_error_is_raised_and_the_client_stays_usable(
    stream_prefix: str, redis_url: str
) -> None:
    sim = Simulation(SimConfig(start_ms=START_MS, seed=6, vehicles=1, length_km=10))
    entries = entries_of(sim)[:50]
    client = redis.Redis.from_url(redis_url, single_connection_client=False)
    try:
        client.set(f"{stream_prefix}:not-a-stream", "x")
        with pytest.raises(redis.ResponseError):
            RedisSink(client, f"{stream_prefix}:not-a-stream").write(entries)
        sink = RedisSink(client, f"{stream_prefix}:records", maxlen=1_000)
        sink.write(entries)
        assert client.xlen(f"{stream_prefix}:records") == 50
    finally:
        client.close()


def test_replaying_a_simulated_race_times_it_and_finds_its_incidents(tmp_path: Path) -> None:
    """The simulator's files through ``processor replay``: what was injected is what is seen."""
    from processor.cli import cli

    runner = CliRunner()
    files = {name: str(tmp_path / name) for name in ("course.json", "positions.csv")}
    made = runner.invoke(
        simulate,
        [
            "--seed", "12", "--vehicles", "12", "--length-km", "10", "--start", START,
            "--out", str(tmp_path / "entries.jsonl"), "--positions-csv", files["positions.csv"],
            "--course-out", files["course.json"], "--summary", "json",
        ],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    replayed = runner.invoke(
        cli,
        ["replay", "--course", files["course.json"], "--positions", files["positions.csv"],
         "--format", "json"],
    )  # fmt: skip
    assert replayed.exit_code == 0, replayed.output
    result = orjson.loads(replayed.output)
    sim = Simulation(SimConfig(start_ms=START_MS, seed=12, vehicles=12, length_km=10))
    number = {v.imei: n for n, v in enumerate(sim.vehicles, start=1)}
    planned = {name: {number[v.imei] for v in sim.vehicles if name in v.incidents.names}
               for name in ("dnf", "crash", "speeding", "missed_waypoint", "sos")}  # fmt: skip
    finished = {r["entry"] for r in result["stage_results"] if r["status"] == "finished"}
    assert finished == set(range(1, 13)) - planned["dnf"] - planned["crash"]
    penalised = {(p["reason"], p["entry"]) for p in result["penalties"]}
    assert {e for reason, e in penalised if reason == "speeding"} == planned["speeding"]
    assert {e for reason, e in penalised if reason == "missed_waypoint"} == planned[
        "missed_waypoint"
    ]
    kinds = {a["kind"] for a in result["anomalies"]}
    assert {"sos", "crash", "low_battery", "clock", "gps_jump"} <= kinds
