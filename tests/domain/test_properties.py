"""Properties: order, duplicates and batching never change the result; nothing raises."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.domain.engine import LiveEngine, evaluate
from processor.domain.model import Course, Position
from processor.domain.output import to_json, to_table
from tests.domain.helpers import T0, box, course, fix, gate, waypoint

IMEIS = ["356307042440000", "356307042440001", "356307042449999"]  # the last is no entry's

FEATURES = [
    gate("start", "Start", -50, 0, 50, 0),
    gate("split", "Split", -50, 400, 50, 400),
    gate("finish", "Finish", -50, 800, 50, 800),
    waypoint("WP", 0, 600, 20),
    box("speed_zone", "Village", -60, 150, 60, 300, speed_limit_kmh=50),
    box("forbidden_zone", "Field", 30, 500, 80, 550),
]
ENTRIES = [
    {"id": 1, "number": 1, "class": "A", "imei": IMEIS[0]},
    {"id": 2, "number": 2, "class": "B", "imei": IMEIS[1]},
]


def _course(scheduled: bool) -> Course:
    return course(
        FEATURES,
        entries=ENTRIES,
        stage={"closes_at": T0 + 900_000, "start_mode": "scheduled" if scheduled else "gate"},
        start_times=[{"stage": 1, "entry": 1, "scheduled_at": T0 + 20_000}],
        rules={"rearm_s": 5, "stopped_alert_s": 20, "offline_after_s": 15},
    )


@st.composite
def tracks(draw: st.DrawFn) -> list[Position]:
    """Drives north through the course (so gates are crossed) with random stops, gaps,
    jitter, spikes and odd records; plus a device that is no entry's."""
    out: list[Position] = []
    for imei in IMEIS:
        if draw(st.integers(0, 5)) == 0:
            continue  # this device sends nothing
        speed = draw(st.floats(3, 45))  # m/s
        step = draw(st.integers(300, 6000))  # ms between records
        x = draw(st.floats(-40, 40))
        y = draw(st.floats(-120, -5))
        t = draw(st.integers(0, 60_000))
        flavours = draw(
            st.dictionaries(
                st.integers(0, 200),
                st.sampled_from(["nofix", "io", "sos", "late", "zero", "spike", "stop", "back"]),
                max_size=12,
            )
        )
        i = 0
        while y < 900 and i < 400:
            flavour = flavours.get(i, "fix")
            t += step * (draw(st.integers(2, 40)) if flavour == "stop" else 1)
            y += -35.0 if flavour == "back" else speed * step / 1000
            x = min(max(x + draw(st.floats(-3, 3)), -45.0), 45.0)
            out.append(_record(imei, x, y, t, int(speed * 3.6), flavour, draw))
            i += 1
    return out


def _record(imei: str, x: float, y: float, t: int, speed: int, flavour: str, draw) -> Position:
    p = fix(x, y, t, imei=imei, speed=speed)
    if flavour == "nofix":
        return replace(p, sat=0)
    if flavour == "io":
        io_id = draw(st.sampled_from([69, 113, 247, 252, 318]))
        return replace(p, io={io_id: draw(st.integers(0, 30))})
    if flavour == "sos":
        return replace(p, priority=2)
    if flavour == "late":  # a backlog record received much later
        return replace(p, received_at=p.received_at + draw(st.integers(1, 200_000)))
    if flavour == "zero":
        return replace(p, lat=0.0, lon=0.0)
    if flavour == "spike":
        return fix(x + draw(st.sampled_from([-3000.0, 4000.0])), y, t, imei=imei, speed=speed)
    if flavour == "stop":
        return replace(p, speed=0)
    return p


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(positions=tracks(), scheduled=st.booleans(), data=st.data())
def test_shuffling_and_duplicating_positions_does_not_change_the_output(
    positions: list[Position], scheduled: bool, data: st.DataObject
) -> None:
    c = _course(scheduled)
    shuffled = data.draw(st.permutations(positions))
    duplicated = shuffled + data.draw(st.lists(st.sampled_from(positions))) if positions else []
    now = data.draw(st.none() | st.integers(T0, T0 + 1_000_000))
    expected = evaluate(c, positions, now)
    assert evaluate(c, duplicated, now) == expected
    assert to_json(evaluate(c, duplicated, now)) == to_json(expected)


@FAST
@given(positions=tracks(), scheduled=st.booleans(), data=st.data())
def test_incremental_batches_in_any_order_equal_one_pass(
    positions: list[Position], scheduled: bool, data: st.DataObject
) -> None:
    c = _course(scheduled)
    order = data.draw(st.permutations(positions))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=6)))
    engine = LiveEngine(c, source="replay")
    previous = 0
    for cut in [*cuts, len(order)]:
        engine.add(order[previous:cut])
        previous = cut
        if data.draw(st.booleans()):
            engine.tick(data.draw(st.integers(T0, T0 + 1_000_000)))
    now = data.draw(st.integers(T0, T0 + 1_000_000))
    engine.tick(now)
    assert engine.result() == evaluate(c, positions, now)


@FAST
@given(positions=tracks(), data=st.data())
def test_live_add_reports_every_changed_entry_stage(
    positions: list[Position], data: st.DataObject
) -> None:
    c = _course(False)
    engine = LiveEngine(c, source="replay")
    cut = data.draw(st.integers(0, len(positions)))
    order = data.draw(st.permutations(positions))
    engine.add(order[:cut])
    before = _rows_by_pair(engine.result())
    affected = engine.add(order[cut:])
    after = _rows_by_pair(engine.result())
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed <= affected


def _rows_by_pair(result) -> dict:
    rows: dict = {}
    for row in (*result.timing_records, *result.penalties, *result.stage_results):
        rows.setdefault((row.stage_id, row.entry_number), []).append(row)
    return rows


wild_ints = st.integers(-(2**62), 2**62)
wild_floats = st.floats(allow_nan=True, allow_infinity=True)
wild_positions = st.builds(
    Position,
    imei=st.sampled_from(IMEIS),
    ts=st.one_of(wild_ints, st.integers(T0 - 4_000_000, T0 + 1_000_000)),
    lat=st.one_of(wild_floats, st.floats(44.99, 45.01)),
    lon=st.one_of(wild_floats, st.floats(13.99, 14.01)),
    alt=wild_ints,
    angle=wild_ints,
    sat=st.integers(-5, 30),
    speed=st.integers(-10, 1000),
    priority=st.integers(-1, 3),
    event_io=wild_ints,
    received_at=st.one_of(wild_ints, st.integers(T0 - 4_000_000, T0 + 1_000_000)),
    io=st.dictionaries(
        st.sampled_from([69, 113, 247, 252, 318, 16]),
        st.one_of(wild_ints, st.binary(max_size=4)),
        max_size=3,
    ),
)


@FAST
@given(
    positions=st.lists(wild_positions, max_size=40),
    scheduled=st.booleans(),
    now=st.none() | wild_ints,
)
def test_no_input_makes_the_engine_raise(
    positions: list[Position], scheduled: bool, now: int | None
) -> None:
    result = evaluate(_course(scheduled), positions, now)
    to_json(result)
    to_table(result)
    engine = LiveEngine(_course(scheduled))
    affected = engine.add(positions)
    if now is not None:
        affected |= engine.tick(now)
    to_json(engine.result_for(affected))
    assert all(math.isfinite(a.started_at) for a in result.anomalies)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(-200, 200)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


def _replace(document: object, path: tuple, new: object) -> object:
    if not path:
        return new
    head, *rest = path
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[head] = _replace(copy[head], tuple(rest), new)
    return copy


@FAST
@given(data=st.data())
def test_a_mangled_course_file_is_rejected_cleanly_or_evaluated(data: st.DataObject) -> None:
    import orjson

    from processor.domain.model import CourseError

    document = orjson.loads(orjson.dumps(_course(True).to_dict()))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(document)))
        document = _replace(document, path, data.draw(json_values))
    try:
        mangled = Course.from_dict(document)
    except CourseError:
        return
    evaluate(mangled, data.draw(tracks()), T0 + 1_000_000)


@FAST
@given(lines=st.lists(st.text(max_size=80), max_size=6), header=st.booleans())
def test_any_text_parses_or_fails_with_a_positions_error(lines: list[str], header: bool) -> None:
    from processor.domain.positions_csv import PositionsError, parse_positions

    text = (
        ["imei,ts,lat,lon,alt,angle,sat,speed,priority,event_io,received_at,io\n"] if header else []
    )
    with contextlib.suppress(PositionsError):
        parse_positions([*text, *(line + "\n" for line in lines)])
