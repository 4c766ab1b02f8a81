"""Gate crossings: interpolated times, direction, lines, passes, start modes."""

from __future__ import annotations

import pytest

from processor.domain.engine import evaluate
from tests.domain.helpers import STANDARD, T0, course, gate, ms, straight, track


def _records(result, kind=None):
    return [r for r in result.timing_records if kind is None or r.kind == kind]


@pytest.mark.parametrize(
    ("y_from", "speed", "step_ms", "expected_ms"),
    [
        (-3.7, 10.0, 1000, 370),  # s = 3.7 / 10
        (-5.0, 7.0, 1000, 714),  # 5/7 s = 714.2857 ms
        (-5.0, 7.0, 2000, 714),  # fixes 14 m apart: 5/14 · 2000 = 714.28 ms
    ],
)
def test_gate_crossed_at_constant_speed_gives_the_interpolated_millisecond(
    y_from: float, speed: float, step_ms: int, expected_ms: int
) -> None:
    fixes = straight(y_from, 50, speed, step_ms=step_ms)
    result = evaluate(course(STANDARD), fixes)
    (start,) = _records(result, "start")
    # Constant speed: the gate at y = 0 is reached after -y_from / speed seconds.
    assert start.ts == T0 + round(-y_from / speed * 1000)
    assert start.ts == T0 + expected_ms
    assert start.confidence == "high"
    assert start.method == "interpolated"


def test_crossing_time_rounds_half_up_to_the_millisecond() -> None:
    # Fixes 1 ms apart would be unrealistic; use 3 ms: s = 0.5 → 1.5 ms → 2 ms.
    fixes = track([-1.0, 1.0], 3)
    result = evaluate(course(STANDARD), fixes)
    assert _records(result, "start")[0].ts == T0 + 2


def test_oblique_gate_crossing_time_is_exact() -> None:
    # Gate from (-50, -50) to (50, 50) (a 45° line y = x), competitor going north at x = 10:
    # it meets the line at y = 10, i.e. 30 m after y = -20, at 10 m/s → 3000 ms.
    # Approaching from the side x > y, where cross(B−A, P−A) = 100·(y − x) < 0.
    features = [gate("start", "Start", -50, -50, 50, 50), STANDARD[1]]
    fixes = track([-20.0 + 10 * i for i in range(8)], 1000, x=10.0)
    result = evaluate(course(features), fixes)
    assert [r.ts for r in _records(result, "start")] == [T0 + 3000]


def test_fix_exactly_on_the_line_counts_once_at_its_time() -> None:
    fixes = track([-10.0, 0.0, 10.0, 20.0], 1000)
    result = evaluate(course(STANDARD), fixes)
    starts = _records(result, "start")
    assert [(r.ts, r.pass_) for r in starts] == [(T0 + 1000, 1)]


def test_touching_the_line_and_going_back_counts_once() -> None:
    fixes = track([-10.0, 0.0, -10.0, -20.0], 1000)
    result = evaluate(course(STANDARD), fixes)
    assert len(_records(result, "start")) == 1


def test_backward_crossing_is_ignored() -> None:
    fixes = track([20.0, 10.0, -10.0, -20.0], 1000)
    result = evaluate(course(STANDARD), fixes)
    assert _records(result) == []
    assert result.stage_results[0].status == "not_started"


def test_crossing_beside_the_gate_is_ignored() -> None:
    fixes = track([-10.0, 10.0], 1000, x=60.0)  # gate spans x in [-50, 50]
    assert _records(evaluate(course(STANDARD), fixes)) == []


def test_jitter_within_rearm_is_ignored_and_a_later_crossing_is_pass_two() -> None:
    ys = [-5.0, 5.0, -5.0, 5.0]  # crossings at 500 and 2500 ms (2 s apart: jitter)
    ys += [-5.0] * 40 + [5.0]  # back south, then across again at 44.5 s
    fixes = track(ys, 1000)
    result = evaluate(course(STANDARD), fixes)
    starts = _records(result, "start")
    assert [(r.pass_, r.ts) for r in starts] == [(1, T0 + 500), (2, T0 + 43_500)]
    assert result.stage_results[0].start_ts == T0 + 500


def test_low_confidence_when_fixes_are_further_apart_than_the_interpolation_gap() -> None:
    fixes = track([-5.0, 5.0], 11_000)
    (start,) = _records(evaluate(course(STANDARD), fixes), "start")
    assert start.ts == T0 + 5500
    assert start.confidence == "low"


def test_elapsed_is_finish_minus_start_and_splits_between() -> None:
    features = [*STANDARD, gate("split", "Split 1", -50, 500, 50, 500)]
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000)
    result = evaluate(course(features), fixes)
    (row,) = result.stage_results
    assert (row.status, row.start_ts, row.finish_ts) == ("finished", ms(500), ms(100_500))
    assert row.elapsed_ms == row.total_ms == 100_000
    assert [r.ts for r in _records(result, "split")] == [ms(50_500)]


def test_finish_crossed_before_the_start_is_not_a_finish() -> None:
    fixes = track([995.0, 1005.0], 1000) + track([-5.0, 5.0], 1000, t_from=100_000)
    result = evaluate(course(STANDARD), fixes)
    (row,) = result.stage_results
    assert (row.status, row.start_ts, row.finish_ts) == ("running", ms(100_500), None)


def _scheduled(at_ms: int):
    return course(
        STANDARD,
        stage={"start_mode": "scheduled"},
        start_times=[{"stage": 1, "entry": 1, "scheduled_at": T0 + at_ms}],
    )


def test_scheduled_start_is_the_start_even_when_crossing_later() -> None:
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000, t_from=20_000)
    result = evaluate(_scheduled(10_000), fixes)
    (row,) = result.stage_results
    assert row.start_ts == ms(10_000)
    assert row.finish_ts == ms(120_500)
    assert row.elapsed_ms == 110_500
    assert result.penalties == ()


def test_crossing_the_start_before_the_scheduled_time_is_a_jump_start() -> None:
    fixes = track([-5.0 + 10 * i for i in range(102)], 1000)
    result = evaluate(_scheduled(10_000), fixes)
    (row,) = result.stage_results
    (penalty,) = result.penalties
    assert (penalty.reason, penalty.seconds, penalty.geofence_name) == ("jump_start", 60, "Start")
    assert row.start_ts == ms(10_000)  # the start stays the scheduled time
    assert row.elapsed_ms == 90_500
    assert row.penalty_ms == 60_000
    assert row.total_ms == 150_500
