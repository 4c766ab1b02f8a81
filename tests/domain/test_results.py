"""Stage results: statuses, ranks with ties, class ranks, gaps, overall standings."""

from __future__ import annotations

from processor.domain.engine import evaluate
from processor.domain.model import Course
from tests.domain.helpers import STANDARD, T0, course, lonlat, track, waypoint

YS = [-5.0 + 10 * i for i in range(102)]  # start at fix 0→1, finish at fix 100→101


def _entries(classes: list[str]):
    return [
        {"id": i + 1, "number": 10 + i, "class": klass, "imei": f"35630704244{i:04d}"}
        for i, klass in enumerate(classes)
    ]


def test_ranks_share_ties_and_skip_class_ranks_and_gaps() -> None:
    steps = [1000, 1100, 1100, 1200]  # elapsed 100 s, 110 s, 110 s, 120 s
    classes = ["T1", "T2", "T1", "T1"]
    fixes = []
    for i, step in enumerate(steps):
        fixes += track(YS, step, imei=f"35630704244{i:04d}")
    result = evaluate(course(STANDARD, entries=_entries(classes)), fixes)
    rows = {r.entry_number: r for r in result.stage_results}
    assert [rows[n].elapsed_ms for n in (10, 11, 12, 13)] == [100_000, 110_000, 110_000, 120_000]
    assert [rows[n].rank for n in (10, 11, 12, 13)] == [1, 2, 2, 4]
    assert [rows[n].class_rank for n in (10, 11, 12, 13)] == [1, 1, 2, 3]
    assert [rows[n].gap_ms for n in (10, 11, 12, 13)] == [0, 10_000, 10_000, 20_000]


def test_penalties_count_in_the_total_and_the_rank() -> None:
    wp = waypoint("WP1", 200, 500, 10, penalty_s=30)
    fixes = track(YS, 1000, imei="356307042440000") + track(YS, 1100, imei="356307042440001")
    result = evaluate(course([*STANDARD, wp], entries=_entries(["T1", "T1"])), fixes)
    rows = {r.entry_number: r for r in result.stage_results}
    assert (rows[10].total_ms, rows[11].total_ms) == (130_000, 140_000)
    assert (rows[10].rank, rows[11].rank) == (1, 2)


def test_unfinished_entry_is_running_while_open_and_dnf_when_closed() -> None:
    fixes = track(YS[:50], 1000)
    open_result = evaluate(course(STANDARD), fixes)
    assert open_result.stage_results[0].status == "running"
    closed = evaluate(course(STANDARD, stage={"status": "closed"}), fixes)
    assert closed.stage_results[0].status == "dnf"
    assert closed.stage_results[0].rank is None
    by_clock = evaluate(course(STANDARD), fixes, now_ms=T0 + 6 * 3_600_000)
    assert by_clock.stage_results[0].status == "dnf"
    before_close = evaluate(course(STANDARD), fixes, now_ms=T0 + 3_600_000)
    assert before_close.stage_results[0].status == "running"


def test_waypoint_missed_is_penalised_when_the_stage_closes() -> None:
    fixes = track(YS[:50], 1000)
    result = evaluate(
        course([*STANDARD, waypoint("WP1", 200, 500, 10)], stage={"status": "closed"}), fixes
    )
    assert [p.reason for p in result.penalties] == ["missed_waypoint"]


def test_entry_without_data_is_not_started_and_withdrawn_is_dnf() -> None:
    entries = _entries(["T1", "T1"])
    entries[1]["status"] = "withdrawn"
    result = evaluate(course(STANDARD, entries=entries), [])
    assert [r.status for r in result.stage_results] == ["not_started", "dnf"]


def test_disqualified_entry_is_not_ranked() -> None:
    entries = _entries(["T1", "T1"])
    entries[0]["status"] = "dsq"
    fixes = track(YS, 1000, imei="356307042440000") + track(YS, 1100, imei="356307042440001")
    rows = evaluate(course(STANDARD, entries=entries), fixes).stage_results
    assert [(r.entry_number, r.status, r.rank) for r in rows] == [
        (10, "finished", None),
        (11, "finished", 1),
    ]


def test_device_swap_gives_each_entry_only_its_validity_window() -> None:
    entries = _entries(["T1", "T1"])
    entries[0].update(imei="356307042449999", valid_to=T0 + 50_000)
    entries[1].update(imei="356307042449999", valid_from=T0 + 50_001)
    result = evaluate(course(STANDARD, entries=entries), track(YS, 1000, imei="356307042449999"))
    rows = {r.entry_number: r for r in result.stage_results}
    assert rows[10].status == "running"  # started, the finish belongs to the other entry
    assert rows[11].status == "not_started"  # never crossed the start while it owned it


def _two_stages() -> Course:
    def feature(stage: int, kind: str, y: float) -> dict:
        return {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [lonlat(-50, y), lonlat(50, y)]},
            "properties": {"kind": kind, "name": kind.title(), "stage": stage},
        }

    hour = 3_600_000
    return Course.from_dict(
        {
            "event": {"id": 1, "name": "Two stages"},
            "stages": [
                {"id": 1, "name": "SS1", "sequence": 1, "opens_at": T0, "closes_at": T0 + hour},
                {
                    "id": 2,
                    "name": "SS2",
                    "sequence": 2,
                    "opens_at": T0 + hour,
                    "closes_at": T0 + 2 * hour,
                },
                {
                    "id": 3,
                    "name": "L1",
                    "sequence": 3,
                    "kind": "liaison",
                    "opens_at": T0 + 2 * hour,
                    "closes_at": T0 + 3 * hour,
                },
            ],
            "geofences": {
                "type": "FeatureCollection",
                "features": [
                    feature(s, kind, y)
                    for s in (1, 2, 3)
                    for kind, y in (("start", 0), ("finish", 1000))
                ],
            },
            "entries": _entries(["T1", "T1", "T2"]),
        }
    )


def test_overall_ranks_more_stages_first_then_lower_sum_of_special_stages() -> None:
    hour = 3_600_000
    fixes = []
    # Entry 10: SS1 100 s, SS2 100 s. Entry 11: SS1 90 s only. Entry 12: 110 s + 100 s.
    # Everyone's liaison is ignored in the overall.
    plan = {0: [(0, 1000), (hour, 1000)], 1: [(0, 900)], 2: [(0, 1100), (hour, 1000)]}
    for i, stages in plan.items():
        for t_from, step in stages:
            fixes += track(YS, step, t_from=t_from + 1000, imei=f"35630704244{i:04d}")
        fixes += track(YS, 500, t_from=2 * hour + 1000, imei=f"35630704244{i:04d}")
    result = evaluate(_two_stages(), fixes)
    overall = [(s.entry_number, s.rank, s.stages_finished, s.total_ms, s.gap_ms, s.class_rank)
               for s in result.overall]  # fmt: skip
    assert overall == [
        (10, 1, 2, 200_000, 0, 1),
        (12, 2, 2, 210_000, 10_000, 1),
        (11, 3, 1, 90_000, None, 2),
    ]
