"""Offline replay throughput: 200 entries on one stage with 20 geofences.

Run: ``python -m benchmarks.replay_bench [--entries 200] [--repeat 3] [--keep DIR]``. One
core. The script writes a course file and a positions.csv of its own (a 30 km wavy route,
1 Hz fixes at 45–110 km/h with GPS noise; start, finish, 6 splits, 9 waypoints, 2 speed
zones and 1 forbidden zone), then times, in the same run, parsing the file alone, the
engine alone (:func:`evaluate`) and the whole replay (parse + evaluate + JSON), best of
``--repeat``. Target: ≥ 100k positions/s for the engine on one core.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from processor.domain.engine import LiveEngine, evaluate
from processor.domain.geometry import M_PER_DEG
from processor.domain.model import Course
from processor.domain.output import to_json
from processor.domain.positions_csv import parse_positions

TARGET = 100_000
ORIGIN = (45.0, 14.0)
T0 = 1_717_243_200_000
ROUTE_M = 30_000.0
HEADER = "imei,ts,lat,lon,alt,angle,sat,speed,priority,event_io,received_at,io\n"


def route(x: float) -> float:
    """The route's northing (m) at easting x: a wavy road."""
    return 400.0 * math.sin(x / 2500.0) + 150.0 * math.sin(x / 700.0)


def heading(x: float) -> tuple[float, float]:
    """Unit direction of travel at easting x."""
    dy = 400.0 / 2500.0 * math.cos(x / 2500.0) + 150.0 / 700.0 * math.cos(x / 700.0)
    norm = math.hypot(1.0, dy)
    return 1.0 / norm, dy / norm


def lonlat(x: float, y: float) -> list[float]:
    lat0, lon0 = ORIGIN
    return [lon0 + x / (M_PER_DEG * math.cos(math.radians(lat0))), lat0 + y / M_PER_DEG]


def feature(kind: str, name: str, geometry: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"kind": kind, "name": name, "stage": 1, **props},
    }


def gate(kind: str, name: str, x: float) -> dict[str, Any]:
    ux, uy = heading(x)
    y = route(x)
    left = (-uy * 40.0, ux * 40.0)
    coords = [lonlat(x + left[0], y + left[1]), lonlat(x - left[0], y - left[1])]
    return feature(kind, name, {"type": "LineString", "coordinates": coords})


def zone(kind: str, name: str, x1: float, x2: float, dy: float, **props: Any) -> dict[str, Any]:
    y = route((x1 + x2) / 2) + dy
    ring = [lonlat(x1, y - 400), lonlat(x2, y - 400), lonlat(x2, y + 400), lonlat(x1, y + 400)]
    return feature(kind, name, {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}, **props)


def make_course(entries: int) -> dict[str, Any]:
    features = [gate("start", "Start", 200.0), gate("finish", "Finish", ROUTE_M - 200)]
    features += [gate("split", f"Split {i}", 4000.0 * i) for i in range(1, 7)]
    for i in range(9):
        x = 1500.0 + 3000.0 * i
        geometry = {"type": "Point", "coordinates": lonlat(x, route(x) + 10.0)}
        features.append(
            feature("waypoint", f"WP{i + 1}", geometry, radius_m=30, waypoint_type="WPV")
        )
    features.append(zone("speed_zone", "Village A", 5000, 6000, 0, speed_limit_kmh=50))
    features.append(zone("speed_zone", "Village B", 20000, 21500, 0, speed_limit_kmh=50))
    features.append(zone("forbidden_zone", "Farm", 12000, 12300, 700))
    return {
        "event": {"id": 1, "name": "Benchmark rally"},
        "stages": [{"id": 1, "name": "SS1", "opens_at": T0, "closes_at": T0 + 4 * 3_600_000}],
        "geofences": {"type": "FeatureCollection", "features": features},
        "entries": [
            {"id": i + 1, "number": i + 1, "class": "T1" if i % 3 else "T2", "imei": imei(i)}
            for i in range(entries)
        ],
    }


def imei(index: int) -> str:
    return f"35630704{index:07d}"


def drive(rng: random.Random, index: int) -> list[str]:
    """One entry's CSV rows: 1 Hz fixes from before the start to after the finish."""
    rows = []
    t = T0 + index * 30_000
    x = 0.0
    cruise = rng.uniform(60, 110)
    careful = rng.random() < 0.7
    io = '"{""69"":1,""113"":87,""66"":12850,""239"":1}"'
    while x < ROUTE_M:
        in_village = 5000 <= x <= 6000 or 20000 <= x <= 21500
        speed = (45.0 if careful else cruise * 0.8) if in_village else cruise
        speed *= rng.uniform(0.95, 1.05)
        ux, uy = heading(x)
        y = route(x) + rng.gauss(0, 3.0)
        lon, lat = lonlat(x + rng.gauss(0, 3.0), y)
        angle = int(math.degrees(math.atan2(ux, uy))) % 360
        rows.append(
            f"{imei(index)},{t},{lat:.7f},{lon:.7f},120,{angle},"
            f"11,{round(speed)},0,0,{t + rng.randrange(200, 2000)},{io}\n"
        )
        x += speed / 3.6 * ux
        t += 1000
    return rows


def write_files(directory: Path, entries: int, seed: int) -> tuple[Path, Path, int]:
    rng = random.Random(seed)
    course_path = directory / "course.json"
    course_path.write_bytes(orjson.dumps(make_course(entries)))
    positions_path = directory / "positions.csv"
    count = 0
    with positions_path.open("w", encoding="utf-8") as handle:
        handle.write(HEADER)
        for index in range(entries):
            rows = drive(rng, index)
            count += len(rows)
            handle.writelines(rows)
    return course_path, positions_path, count


def best(work: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Seconds of the fastest of ``repeat`` runs, and the last run's value."""
    fastest = math.inf
    value = None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        value = work()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, value


def live_batches(course: Course, positions: list[Any], warm_s: int, seconds: int) -> float:
    """Seconds to feed ``seconds`` one-second batches (every entry's next fix) to a live
    engine already holding the first ``warm_s`` seconds of every entry."""
    by_imei: dict[str, list[Any]] = {}
    for position in positions:
        by_imei.setdefault(position.imei, []).append(position)
    engine = LiveEngine(course)
    engine.add([p for track in by_imei.values() for p in track[:warm_s]])
    batches = [
        [track[k] for track in by_imei.values() if k < len(track)]
        for k in range(warm_s, warm_s + seconds)
    ]
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        engine.add(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write the generated files here")
    parser.add_argument("--live-seconds", type=int, default=60,
                        help="one-second live batches to time after 600 s of history")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        course_path, positions_path, count = write_files(directory, args.entries, args.seed)
        course = Course.from_dict(orjson.loads(course_path.read_bytes()))

        def parse() -> list[Any]:
            with positions_path.open(encoding="utf-8", newline="") as handle:
                return parse_positions(handle)

        parse_s, positions = best(parse, args.repeat)
        engine_s, result = best(lambda: evaluate(course, positions), args.repeat)
        json_s, output = best(lambda: to_json(result), args.repeat)
        live_s = live_batches(course, positions, 600, args.live_seconds)
    finished = sum(1 for r in result.stage_results if r.status == "finished")
    print(f"positions: {count}  entries: {args.entries}  geofences: {len(course.geofences)}")
    print(f"results: {finished} finished, {len(result.timing_records)} timing records, "
          f"{len(result.penalties)} penalties, {len(result.anomalies)} anomalies, "
          f"{len(output)} bytes of JSON")  # fmt: skip
    rows = [
        ("parse positions.csv only (reference)", parse_s),
        ("engine: evaluate()", engine_s),
        ("JSON output", json_s),
        ("whole replay (parse + engine + JSON)", parse_s + engine_s + json_s),
    ]
    for label, seconds in rows:
        print(f"{label:<40} {seconds:8.3f} s  {count / seconds:>10,.0f} positions/s")
    live_count = args.live_seconds * args.entries
    print(
        f"{'live: 1 s batches, 600 s of history held':<40} {live_s / args.live_seconds * 1000:8.1f}"
        f" ms/batch {live_count / live_s:>7,.0f} positions/s ({args.entries} entries per batch)"
    )
    verdict = "PASS" if count / engine_s >= TARGET else "FAIL"
    print(f"engine target >= {TARGET:,} positions/s on one core: {verdict}")


if __name__ == "__main__":
    main()
