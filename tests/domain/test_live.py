"""The live engine: in-order, late and duplicated data, ticks, and what it reports."""

from __future__ import annotations

from dataclasses import replace

from processor.domain.engine import LiveEngine, evaluate
from tests.domain.helpers import STANDARD, T0, course, fix, ms, track, waypoint

YS = [-5.0 + 10 * i for i in range(102)]
FEATURES = [*STANDARD, waypoint("WP1", 0, 500, 10)]


def _one_by_one(positions, now=None):
    engine = LiveEngine(course(FEATURES), source="replay")
    for position in positions:
        engine.add([position])
    if now is not None:
        engine.tick(now)
    return engine.result()


def test_fixes_one_by_one_equal_one_pass_even_with_a_spike_at_the_head() -> None:
    fixes = track(YS, 1000)
    fixes[30] = fix(4000, YS[30], 30_000)  # a spike: judged only once fix 31 arrives
    expected = evaluate(course(FEATURES), fixes)
    assert _one_by_one(fixes) == expected
    assert [a.kind for a in expected.anomalies] == ["gps_jump"]


def test_a_backlog_of_older_fixes_recomputes_the_entry() -> None:
    fixes = track(YS, 1000)
    live, backlog = fixes[:20] + fixes[90:], fixes[20:90]  # a coverage gap, uploaded later
    engine = LiveEngine(course(FEATURES), source="replay")
    engine.add(live)
    assert engine.result().stage_results[0].waypoints_validated == 0  # a 70 s gap: no track
    affected = engine.add(backlog)
    assert affected == {(1, 101)}
    assert engine.result() == evaluate(course(FEATURES), fixes)
    assert engine.result().stage_results[0].waypoints_validated == 1


def test_duplicates_resolve_to_the_earliest_received_in_any_order() -> None:
    fixes = track(YS, 1000)
    resent = replace(fixes[50], received_at=fixes[50].received_at + 5000, speed=99)
    first = _one_by_one([*fixes, resent])
    second = _one_by_one([*fixes[:50], resent, *fixes[50:]])
    assert first == second == evaluate(course(FEATURES), fixes)


def test_adding_nothing_new_reports_nothing() -> None:
    engine = LiveEngine(course(FEATURES))
    fixes = track(YS[:10], 1000)
    assert engine.add(fixes) == {(1, 101)}
    assert engine.add(fixes) == set()
    assert engine.add([fix(0, 0, 0, imei="999999999999999")]) == set()


def test_tick_closes_the_stage_and_raises_offline_from_the_clock() -> None:
    engine = LiveEngine(course(FEATURES), source="replay")
    engine.add(track(YS[:50], 1000))
    assert engine.tick(ms(49_500 + 60_000)) == set()
    assert engine.tick(ms(49_500 + 120_000)) == {(1, 101)}
    (offline,) = engine.result().anomalies
    assert (offline.kind, offline.started_at, offline.ended_at) == ("offline", ms(49_500), None)
    assert engine.tick(T0 + 6 * 3_600_000) == {(1, 101)}
    result = engine.result()
    assert result.stage_results[0].status == "dnf"
    assert [p.reason for p in result.penalties] == ["missed_waypoint"]
    assert result == evaluate(course(FEATURES), track(YS[:50], 1000), T0 + 6 * 3_600_000)


def test_a_finish_reranks_the_other_entries() -> None:
    entries = [
        {"id": 1, "number": 1, "imei": "356307042440001"},
        {"id": 2, "number": 2, "imei": "356307042440002"},
    ]
    engine = LiveEngine(course(STANDARD, entries=entries))
    engine.add(track(YS, 1100, imei="356307042440002"))
    assert engine.add(track(YS, 1000, imei="356307042440001")) == {(1, 1), (1, 2)}
    ranks = {r.entry_number: r.rank for r in engine.result().stage_results}
    assert ranks == {1: 1, 2: 2}


def test_result_for_gives_the_current_rows_of_the_reported_pairs() -> None:
    entries = [
        {"id": 1, "number": 1, "imei": "356307042440001"},
        {"id": 2, "number": 2, "imei": "356307042440002"},
    ]
    engine = LiveEngine(course(STANDARD, entries=entries))
    engine.add(track(YS, 1100, imei="356307042440002"))
    affected = engine.add(track(YS[:50], 1000, imei="356307042440001"))
    assert affected == {(1, 1)}
    partial = engine.result_for(affected)
    full = engine.result()
    assert partial.stage_results == tuple(r for r in full.stage_results if r.entry_number == 1)
    assert partial.timing_records == tuple(r for r in full.timing_records if r.entry_number == 1)
    assert partial.overall == full.overall


def test_multi_stage_event_fed_one_by_one_equals_one_pass() -> None:
    from tests.domain.test_results import YS as ys
    from tests.domain.test_results import _two_stages

    hour = 3_600_000
    fixes = []
    for i in range(3):
        imei = f"35630704244{i:04d}"
        fixes += track(ys, 1000 + 100 * i, t_from=1000, imei=imei)
        second = track(ys, 1000, t_from=hour + 1000, imei=imei)
        if i == 1:  # 70 s without a fix on the second stage
            second[20:90] = [replace(p, sat=0) for p in second[20:90]]
        fixes += second
        fixes += track(ys, 500, t_from=2 * hour + 1000, imei=imei)
    fixes.sort(key=lambda p: p.ts)
    engine = LiveEngine(_two_stages(), source="replay")
    for position in fixes:
        engine.add([position])
        if position.ts % 60_000 < 1000:
            engine.tick(position.ts + 500)
    engine.tick(T0 + 3 * hour)
    expected = evaluate(_two_stages(), fixes, T0 + 3 * hour)
    assert engine.result() == expected
    assert [a.kind for a in expected.anomalies] == ["no_fix"]
