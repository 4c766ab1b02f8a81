"""Waypoints against track segments; speed and forbidden zones with their penalties."""

from __future__ import annotations

import math

import pytest

from processor.domain.engine import evaluate
from tests.domain.helpers import STANDARD, T0, box, course, fix, ms, track, waypoint


def _start_then(fixes):
    """Cross the start at 500 ms first (fixes at y = -5 and 5), then the given fixes."""
    return [*track([-5.0, 5.0], 1000), *fixes]


def test_waypoint_passed_between_two_fixes_outside_the_radius_is_validated() -> None:
    # Circle of 10 m at (0, 50); fixes at (5, 20) and (5, 80) are 30 m away, but the
    # segment passes 5 m from the centre. It enters where (y − 50)² = 100 − 25:
    # y = 50 − √75, s = (30 − √75) / 60 of the 1000 ms between the fixes.
    fixes = _start_then([fix(5, 20, 2000), fix(5, 80, 3000)])
    result = evaluate(course([*STANDARD, waypoint("WP1", 0, 50, 10)]), fixes)
    (record,) = [r for r in result.timing_records if r.kind == "waypoint"]
    expected = 2000 + (30 - math.sqrt(75)) / 60 * 1000
    assert record.ts == T0 + math.floor(expected + 0.5)
    assert record.distance_m == 5.0
    assert (record.before_ts, record.after_ts) == (ms(2000), ms(3000))
    assert result.stage_results[0].waypoints_validated == 1


def test_waypoint_missed_by_the_segments_is_not_validated() -> None:
    fixes = _start_then([fix(12, 20, 2000), fix(12, 80, 3000)])
    result = evaluate(course([*STANDARD, waypoint("WP1", 0, 50, 10)]), fixes)
    assert [r for r in result.timing_records if r.kind == "waypoint"] == []


def test_segment_longer_than_the_track_gap_does_not_validate() -> None:
    fixes = _start_then([fix(0, 20, 2000), fix(0, 80, 2000 + 61_000)])
    result = evaluate(course([*STANDARD, waypoint("WP1", 0, 50, 10)]), fixes)
    assert result.stage_results[0].waypoints_validated == 0


def test_waypoint_before_the_start_does_not_count() -> None:
    fixes = [*track([-60.0, -50.0, -40.0], 1000), *track([-5.0, 5.0], 1000, t_from=5000)]
    result = evaluate(course([*STANDARD, waypoint("WP0", 0, -50, 10)]), fixes)
    assert result.stage_results[0].waypoints_validated == 0


@pytest.mark.parametrize(
    ("props", "rules", "expected_s"),
    [
        ({}, {}, 900),  # the default of missed_waypoint_penalty_s
        ({"waypoint_type": "WPE"}, {}, 600),
        ({"waypoint_type": "WPN"}, {}, 3600),
        ({"waypoint_type": "WPE", "penalty_s": 42}, {}, 42),  # the geofence's own value
        ({}, {"missed_waypoint_penalty_s": {"default": 300}}, 300),
    ],
)
def test_missed_waypoint_penalty_on_finish(props, rules, expected_s) -> None:
    wp = waypoint("WP1", 200, 500, 10)
    wp["properties"].update(props)
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000)
    result = evaluate(course([*STANDARD, wp], rules=rules), fixes)
    (penalty,) = result.penalties
    assert (penalty.reason, penalty.geofence_name, penalty.seconds) == (
        "missed_waypoint",
        "WP1",
        expected_s,
    )
    assert result.stage_results[0].penalty_ms == expected_s * 1000


def test_missed_waypoint_is_not_penalised_while_running() -> None:
    fixes = track([-5.0 + 10 * i for i in range(50)], 1000)
    result = evaluate(course([*STANDARD, waypoint("WP1", 200, 500, 10)]), fixes)
    assert result.penalties == ()
    assert result.stage_results[0].status == "running"


def _zone_run(speeds: list[int], *, rules=None, limit=50):
    """Drive north through a speed zone y ∈ [100, 200] at 10 m/s, fixes at y = 5 + 10 i."""
    zone = box("speed_zone", "SZ", -50, 100, 50, 200, speed_limit_kmh=limit)
    ys = [-5.0 + 10 * i for i in range(40)]
    fixes = [fix(0, y, i * 1000, speed=50) for i, y in enumerate(ys)]
    inside = [i for i, y in enumerate(ys) if 100 <= y <= 200]
    for i, speed in zip(inside, speeds, strict=False):
        fixes[i] = fix(0, ys[i], i * 1000, speed=speed)
    return evaluate(course([*STANDARD, zone], rules=rules), fixes)


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        (50, None),  # at the limit: no excess
        (51, 60),  # 1 km/h over
        (70, 60),  # exactly 20 over: still the first band
        (71, 120),  # 21 over
        (90, 120),  # exactly 40 over
        (91, 360),  # 41 over
    ],
)
def test_zone_excess_picks_the_band(top: int, expected: int | None) -> None:
    result = _zone_run([45, top, 50])
    penalties = [p for p in result.penalties if p.reason == "speeding"]
    assert [p.seconds for p in penalties] == ([] if expected is None else [expected])
    if expected is not None:
        assert penalties[0].details["excess_kmh"] == top - 50


def test_zone_tolerance_is_subtracted() -> None:
    result = _zone_run([71], rules={"speed_tolerance_kmh": 5})  # excess 16 → first band
    assert [p.seconds for p in result.penalties] == [60]


def test_zone_min_duration_needs_the_fixes_over_the_limit_to_span_it() -> None:
    assert _zone_run([80, 50], rules={"speed_zone_min_duration_s": 2}).penalties == ()
    spanning = _zone_run([80, 60, 55], rules={"speed_zone_min_duration_s": 2})
    assert [p.seconds for p in spanning.penalties] == [120]


def test_zone_enter_and_exit_are_interpolated_on_the_boundary() -> None:
    result = _zone_run([])
    records = {r.kind: r for r in result.timing_records if r.geofence_name == "SZ"}
    # y = -5 + 10 t: the boundary y = 100 is reached at 10.5 s and y = 200 at 20.5 s.
    assert records["zone_enter"].ts == ms(10_500)
    assert records["zone_exit"].ts == ms(20_500)


def test_forbidden_zone_entry_is_a_penalty_and_a_warning() -> None:
    zone = box("forbidden_zone", "Village", -20, 300, 20, 330)
    fixes = track([-5.0 + 10 * i for i in range(50)], 1000)
    result = evaluate(course([*STANDARD, zone]), fixes)
    (penalty,) = result.penalties
    assert (penalty.reason, penalty.seconds, penalty.geofence_name) == (
        "forbidden_zone",
        600,
        "Village",
    )
    (anomaly,) = result.anomalies
    assert (anomaly.kind, anomaly.severity) == ("forbidden_zone", "warning")
    assert (anomaly.started_at, anomaly.ended_at) == (ms(30_500), ms(33_500))


def test_cutting_a_zone_corner_between_fixes_is_a_passage() -> None:
    # Fixes at (-30, 295) and (30, 355) are both outside the 40 × 30 box; the segment
    # between them crosses its corner region.
    zone = box("forbidden_zone", "Village", -20, 300, 20, 330)
    fixes = _start_then([fix(-30, 295, 2000), fix(30, 355, 3000)])
    result = evaluate(course([*STANDARD, zone]), fixes)
    assert [p.reason for p in result.penalties] == ["forbidden_zone"]


def test_jitter_at_a_zone_boundary_is_one_passage() -> None:
    zone = box("forbidden_zone", "Village", -20, 300, 20, 330)
    ys = [290.0, 305.0, 295.0, 305.0, 295.0, 290.0]
    fixes = _start_then(track(ys, 1000, t_from=2000))
    result = evaluate(course([*STANDARD, zone]), fixes)
    assert len(result.penalties) == 1
