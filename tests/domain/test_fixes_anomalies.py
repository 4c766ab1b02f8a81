"""Which records count, spike removal, and every anomaly kind of DOMAIN.md."""

from __future__ import annotations

import pytest

from processor.domain.engine import evaluate
from processor.domain.fixes import is_fix
from tests.domain.helpers import IMEI, STANDARD, T0, course, fix, ms, track

START = track([-5.0, 5.0], 1000)  # crosses the start at T0 + 500 ms


def _kinds(result):
    return [(a.kind, a.severity, a.started_at, a.ended_at) for a in result.anomalies]


@pytest.mark.parametrize(
    "bad",
    [
        {"sat": 0},
        {"io": {69: 0}},
        {"io": {69: 2}},
        {"received_at": T0 + 1000 - 301_000},  # ts more than 300 s after reception
    ],
)
def test_non_fix_records_are_excluded_from_timing(bad) -> None:
    # A bad record at y = 100 between good fixes at y = -5 and y = 15: used, it would move
    # the crossing to 5/105 s; excluded, the crossing is at 5/20 of the 2 s between fixes.
    records = [fix(0, -5, 0), fix(0, 100, 1000, **bad), fix(0, 15, 2000)]
    assert not is_fix(records[1])
    result = evaluate(course(STANDARD), records)
    assert [r.ts for r in result.timing_records] == [ms(500)]


def test_records_at_zero_zero_or_before_2010_are_not_fixes() -> None:
    assert not is_fix(fix(0, 0, 0, lat=0.0, lon=0.0))
    assert not is_fix(fix(0, 0, 0, ts=1_072_915_200_000))  # 2004-01-01
    assert is_fix(fix(0, 0, 0, io={69: 1}))


def test_spike_is_removed_and_reported_as_gps_jump() -> None:
    fixes = track([-25.0, -15.0], 1000)
    fixes.append(fix(3000, -5, 2000))  # 3 km east for one second
    fixes += track([5.0, 15.0], 1000, t_from=3000)
    result = evaluate(course(STANDARD), fixes)
    # Without the spike the crossing is between y = -15 (1 s) and y = 5 (3 s): at 2.5 s.
    assert [r.ts for r in result.timing_records] == [ms(2500)]
    (jump,) = result.anomalies
    assert (jump.kind, jump.severity, jump.started_at) == ("gps_jump", "info", ms(2000))


def test_a_jump_confirmed_by_later_fixes_is_accepted() -> None:
    # After a 60 s gap the device reappears 3 km away and stays there: a real move.
    fixes = track([-15.0, -5.0], 1000)
    fixes += track([-5.0, 5.0, 15.0], 1000, t_from=3000, x=3000)
    result = evaluate(course(STANDARD), fixes)
    assert [a.kind for a in result.anomalies] == []
    assert result.stage_results[0].status == "not_started"  # crossed 3 km beside the gate
    moved_back = fixes + track([-5.0, 5.0], 1000, t_from=80_000)
    assert evaluate(course(STANDARD), moved_back).stage_results[0].status == "running"


def test_sos_and_crash_are_critical_and_end_at_the_next_normal_record() -> None:
    records = [
        fix(0, -50, 0),
        fix(0, -50, 1000, priority=2),
        fix(0, -50, 2000),
        fix(0, -50, 5000, io={247: 1}, event_io=247),
        fix(0, -50, 6000),
    ]
    assert _kinds(evaluate(course(STANDARD), records)) == [
        ("sos", "critical", ms(1000), ms(2000)),
        ("crash", "critical", ms(5000), ms(6000)),
    ]


def test_io_alerts_keep_their_state_until_the_io_says_otherwise() -> None:
    records = [
        fix(0, -50, 0, io={113: 15}),
        fix(0, -50, 1000),  # no IO 113: still low
        fix(0, -50, 2000, io={113: 60}),
        fix(0, -50, 3000, io={252: 1}),
        fix(0, -50, 4000, io={252: 0}),
        fix(0, -50, 5000, io={318: 1}),
        fix(0, -50, 6000, io={318: 2}),
        fix(0, -50, 7000, io={318: 0}),
        fix(0, -50, 8000, io={318: 1}),
    ]
    assert _kinds(evaluate(course(STANDARD), records)) == [
        ("low_battery", "warning", ms(0), ms(2000)),
        ("power_cut", "warning", ms(3000), ms(4000)),
        ("gnss_jamming", "critical", ms(5000), ms(7000)),
        ("gnss_jamming", "warning", ms(8000), None),
    ]


def test_implausible_clock_is_flagged_by_reception_time_and_kept_out_of_timing() -> None:
    records = [
        fix(0, -5, 0),
        fix(0, 100, 1000, ts=1_072_915_200_000, received_at=T0 + 1500),  # dated 2004
        fix(0, 15, 2000),
    ]
    result = evaluate(course(STANDARD), records)
    assert _kinds(result) == [("clock", "warning", ms(1500), ms(2500))]
    assert [r.ts for r in result.timing_records] == [ms(500)]


def test_stopped_on_a_special_stage_for_the_alert_time() -> None:
    stopped = [fix(0, 10, 1000 + i * 10_000, speed=2) for i in range(1, 20)]  # 10 s … 190 s
    records = [*START, *stopped, fix(0, 20, 200_000, speed=30)]
    result = evaluate(course(STANDARD), records)
    assert _kinds(result) == [("stopped", "warning", ms(11_000), ms(200_000))]
    short = [*START, *stopped[:10], fix(0, 20, 200_000, speed=30)]
    assert _kinds(evaluate(course(STANDARD), short)) == []


def test_stopped_is_not_raised_on_a_liaison() -> None:
    stopped = [fix(0, 10, 1000 + i * 10_000, speed=2) for i in range(1, 20)]
    result = evaluate(course(STANDARD, stage={"kind": "liaison"}), [*START, *stopped])
    assert _kinds(result) == []


def test_offline_from_reception_gaps_while_running() -> None:
    records = [*START, fix(0, 15, 2000), fix(0, 25, 200_000)]  # received at +0.5 s
    result = evaluate(course(STANDARD), records)
    assert _kinds(result) == [("offline", "warning", ms(2500), ms(200_500))]


def test_offline_from_the_clock_only_with_now_and_ends_when_data_resumes() -> None:
    records = [*START, fix(0, 15, 2000)]
    assert _kinds(evaluate(course(STANDARD), records)) == []
    late = evaluate(course(STANDARD), records, now_ms=ms(2500 + 120_000))
    assert _kinds(late) == [("offline", "warning", ms(2500), None)]
    early = evaluate(course(STANDARD), records, now_ms=ms(2500 + 119_999))
    assert _kinds(early) == []


def test_offline_is_not_raised_before_the_start() -> None:
    records = [fix(0, -50, 0), fix(0, -40, 300_000)]
    assert _kinds(evaluate(course(STANDARD), records)) == []


def test_no_fix_for_sixty_seconds_while_running() -> None:
    blind = [fix(0, 5, 2000 + i * 5000, sat=0, speed=0) for i in range(13)]  # 2 s … 62 s
    records = [*START, *blind, fix(0, 30, 70_000)]
    result = evaluate(course(STANDARD), records)
    assert _kinds(result) == [("no_fix", "warning", ms(2000), ms(70_000))]
    shorter = [*START, *blind[:12], fix(0, 30, 70_000)]
    assert _kinds(evaluate(course(STANDARD), shorter)) == []


def test_records_of_other_devices_and_outside_stage_windows_are_ignored() -> None:
    other = [fix(0, -5, 0, imei="111111111111111", priority=2)]
    late = [fix(0, -5, 7 * 3_600_000, priority=2)]  # after the stage closes
    result = evaluate(course(STANDARD), [*other, *late])
    assert result.anomalies == ()
    assert result.stage_results[0].updated_at is None
    assert IMEI != "111111111111111"
