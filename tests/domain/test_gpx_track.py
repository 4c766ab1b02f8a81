"""A real car track (tests/data/around-visnjan-with-car.gpx, Apache-2.0, from gpxpy).

A course is laid across the recorded track: gates perpendicular to chosen segments at a
known fraction, waypoints beside the track. Expectations are computed here, independently
of the engine: crossing times from the construction (a point at fraction f of a segment is
passed at t1 + f·(t2 − t1)), cross-checked by a brute-force intersection over all segments,
and waypoint entries by sampling every millisecond with haversine distances.
"""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pytest

from processor.domain.engine import evaluate
from processor.domain.model import Course, Position

GPX = Path(__file__).parent.parent / "data" / "around-visnjan-with-car.gpx"
NS = {"g": "http://www.topografix.com/GPX/1/1"}
R = 6_371_008.8
IMEI = "352093081234567"

Point = tuple[float, float, int]  # lat, lon, ms


def load_track() -> list[Point]:
    """The GPX track points as (lat, lon, ms since the epoch)."""
    root = ET.parse(GPX).getroot()
    points = []
    for trkpt in root.iterfind(".//g:trkpt", NS):
        when = datetime.fromisoformat(
            trkpt.findtext("g:time", namespaces=NS).replace("Z", "+00:00")
        )
        points.append(
            (float(trkpt.get("lat")), float(trkpt.get("lon")), int(when.timestamp() * 1000))
        )
    return points


def haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * R * math.asin(math.sqrt(a))


def offset(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    return lat + math.degrees(north_m / R), lon + math.degrees(
        east_m / (R * math.cos(math.radians(lat)))
    )


def gate_across(track: list[Point], k: int, f: float, half_width: float = 30.0):
    """A gate perpendicular to segment k at fraction f, drawn left to right."""
    (lat1, lon1, t1), (lat2, lon2, t2) = track[k], track[k + 1]
    lat, lon = lat1 + f * (lat2 - lat1), lon1 + f * (lon2 - lon1)
    east = math.radians(lon2 - lon1) * R * math.cos(math.radians(lat))
    north = math.radians(lat2 - lat1) * R
    norm = math.hypot(east, north)
    left = (-north / norm * half_width, east / norm * half_width)
    a = offset(lat, lon, *left)
    b = offset(lat, lon, -left[0], -left[1])
    coordinates = [[a[1], a[0]], [b[1], b[0]]]
    return coordinates, t1 + f * (t2 - t1)


def brute_force_crossings(track: list[Point], coordinates) -> list[float]:
    """Every forward crossing of a gate, by plain 2D intersection in scaled degrees."""
    (lon_a, lat_a), (lon_b, lat_b) = coordinates
    k = math.cos(math.radians(track[0][0]))
    ax, ay, bx, by = lon_a * k, lat_a, lon_b * k, lat_b
    out = []
    for (lat1, lon1, t1), (lat2, lon2, t2) in itertools.pairwise(track):
        px, py, qx, qy = lon1 * k, lat1, lon2 * k, lat2
        d1 = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        d2 = (bx - ax) * (qy - ay) - (by - ay) * (qx - ax)
        e1 = (qx - px) * (ay - py) - (qy - py) * (ax - px)
        e2 = (qx - px) * (by - py) - (qy - py) * (bx - px)
        if d1 < 0 <= d2 and (e1 > 0) != (e2 > 0):
            out.append(t1 + d1 / (d1 - d2) * (t2 - t1))
    return out


def first_entry_by_sampling(
    track: list[Point], lat: float, lon: float, radius: float, after: float
):
    """First millisecond the track is within ``radius`` of a point, and the closest approach."""
    first = None
    closest = math.inf
    for (lat1, lon1, t1), (lat2, lon2, t2) in itertools.pairwise(track):
        length = haversine(lat1, lon1, lat2, lon2)
        if haversine(lat, lon, lat1, lon1) > length + radius + 50:
            continue  # the segment cannot come near: skip sampling it
        for step in range(t2 - t1 + 1):
            t = t1 + step
            if t < after:
                continue
            f = step / (t2 - t1)
            d = haversine(lat, lon, lat1 + f * (lat2 - lat1), lon1 + f * (lon2 - lon1))
            closest = min(closest, d)
            if first is None and d <= radius:
                first = t
    return first, closest


def positions(track: list[Point]) -> list[Position]:
    out = []
    for i, (lat, lon, t) in enumerate(track):
        j = min(i, len(track) - 2)
        (la1, lo1, t1), (la2, lo2, t2) = track[j], track[j + 1]
        speed = haversine(la1, lo1, la2, lo2) / ((t2 - t1) / 1000) * 3.6
        out.append(Position(IMEI, t, lat, lon, 200, 0, 8, round(speed), 0, 0, t + 800, {}))
    return out


@pytest.fixture(scope="module")
def track() -> list[Point]:
    return load_track()


def _course(track: list[Point]):
    start, t_start = gate_across(track, 14, 0.4)
    split, t_split = gate_across(track, 30, 0.25)
    finish, t_finish = gate_across(track, 86, 0.7)
    lat45, lon45 = offset(track[45][0], track[45][1], 12.0, 0.0)
    mid = (
        track[30][0] + 0.5 * (track[31][0] - track[30][0]),
        track[30][1] + 0.5 * (track[31][1] - track[30][1]),
    )
    lat30, lon30 = offset(mid[0], mid[1], 0.0, 8.0)

    def feature(kind: str, name: str, geometry: dict, **props) -> dict:
        return {
            "type": "Feature",
            "geometry": geometry,
            "properties": {"kind": kind, "name": name, "stage": 1, **props},
        }

    features = [
        feature("start", "Start", {"type": "LineString", "coordinates": start}),
        feature("split", "Split", {"type": "LineString", "coordinates": split}),
        feature("finish", "Finish", {"type": "LineString", "coordinates": finish}),
        feature(
            "waypoint",
            "WP45",
            {"type": "Point", "coordinates": [lon45, lat45]},
            radius_m=20,
            waypoint_type="WPV",
        ),
        feature(
            "waypoint",
            "WP30",
            {"type": "Point", "coordinates": [lon30, lat30]},
            radius_m=15,
            waypoint_type="WPM",
        ),
    ]
    course = Course.from_dict(
        {
            "event": {"id": 1, "name": "Višnjan"},
            "stages": [
                {"id": 1, "name": "SS Višnjan", "opens_at": track[0][2], "closes_at": track[-1][2]}
            ],
            "geofences": {"type": "FeatureCollection", "features": features},
            "entries": [{"id": 1, "number": 7, "imei": IMEI}],
        }
    )
    expected = {"Start": (start, t_start), "Split": (split, t_split), "Finish": (finish, t_finish)}
    waypoints = {"WP45": (lat45, lon45, 20.0), "WP30": (lat30, lon30, 15.0)}
    return course, expected, waypoints


def test_track_file_is_the_recorded_drive(track: list[Point]) -> None:
    assert len(track) == 104
    assert all(b[2] > a[2] for a, b in itertools.pairwise(track))


def test_gate_crossings_on_a_real_track_match_independent_values(track: list[Point]) -> None:
    course, expected, _ = _course(track)
    result = evaluate(course, positions(track))
    records = {
        r.geofence_name: r for r in result.timing_records if r.kind in {"start", "split", "finish"}
    }
    for name, (coordinates, t_expected) in expected.items():
        assert brute_force_crossings(track, coordinates) == pytest.approx([t_expected], abs=0.5)
        assert abs(records[name].ts - t_expected) <= 0.5 + 1e-6, name
    assert records["Split"].confidence == "low"  # 11 s between those fixes
    assert records["Start"].confidence == "high"
    (row,) = result.stage_results
    assert row.status == "finished"
    assert row.elapsed_ms == records["Finish"].ts - records["Start"].ts


def test_waypoints_on_a_real_track_match_sampled_entries(track: list[Point]) -> None:
    course, expected, waypoints = _course(track)
    result = evaluate(course, positions(track))
    records = {r.geofence_name: r for r in result.timing_records if r.kind == "waypoint"}
    start = round(expected["Start"][1])
    for name, (lat, lon, radius) in waypoints.items():
        first, closest = first_entry_by_sampling(track, lat, lon, radius, start)
        assert first is not None
        assert abs(records[name].ts - first) <= 2, name
        assert records[name].distance_m == pytest.approx(closest, abs=0.05)
    # WP30 lies mid-way between fixes 274 m apart: only the segment comes close.
    lat, lon, radius = waypoints["WP30"]
    assert min(haversine(lat, lon, p[0], p[1]) for p in track) > 100 > radius
    assert result.stage_results[0].waypoints_validated == 2
    assert result.penalties == ()
