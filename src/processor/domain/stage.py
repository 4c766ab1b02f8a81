"""One entry on one stage: crossings, start and finish, waypoints, zones, penalties.

The input is the entry's clean fixes in the stage window (sorted, unique ``ts``, spikes
removed); the output is that entry-stage's timing records, penalties and unranked result.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from processor.domain.compiled import CELLS_PER_DEGREE, Shape, StagePlan, candidates, cell_of
from processor.domain.geometry import circle_visit, gate_fraction
from processor.domain.model import Entry, Position, Rules
from processor.domain.rows import Penalty, StageResult, TimingRecord


@dataclass(frozen=True, slots=True)
class Crossing:
    """A point in time interpolated on the segment between two fixes."""

    ts: int
    before_ts: int
    after_ts: int
    speed_kmh: float


# Gate crossings by shape order, and candidate segment indexes by shape order.
Scan = tuple[dict[int, list["Crossing"]], dict[int, list[int]]]
# A segment against a zone: (s where a piece starts, whether the piece is inside).
Pieces = tuple[tuple[float, bool], ...]


@dataclass(frozen=True, slots=True)
class Passage:
    """A zone passage: from entering to leaving (``exit`` None while still inside)."""

    enter: Crossing
    exit: Crossing | None


@dataclass(slots=True)
class Memo:
    """Work kept between evaluations of one entry-stage: each segment's zone pieces, and
    each zone's passages and waypoint's visit for a window and list of candidate segments
    (those lists only grow, except that the newest segment may change)."""

    pieces: dict[tuple[int, int, int], Pieces] = field(default_factory=dict)
    passages: dict[int, tuple[tuple[object, ...], list[Passage]]] = field(default_factory=dict)
    visits: dict[int, tuple[tuple[object, ...], tuple[Crossing, float] | None]] = field(
        default_factory=dict
    )


@dataclass(frozen=True, slots=True)
class StageOutcome:
    """What one entry-stage produced (the result's rank fields are still empty)."""

    records: tuple[TimingRecord, ...]
    penalties: tuple[Penalty, ...]
    result: StageResult
    running: tuple[int, int | None] | None
    forbidden: tuple[tuple[Shape, Passage], ...] = ()


@dataclass(slots=True)
class _Context:
    plan: StagePlan
    entry: Entry
    rules: Rules
    fixes: Sequence[Position]
    source: str
    event_id: Any
    memo: Memo
    records: list[TimingRecord] = field(default_factory=list)
    penalties: list[Penalty] = field(default_factory=list)


def _ts(fix: Position) -> int:
    return fix.ts


def round_ms(value: float) -> int:
    """Round half up to the millisecond."""
    return math.floor(value + 0.5)


def evaluate_stage(
    plan: StagePlan,
    entry: Entry,
    rules: Rules,
    fixes: Sequence[Position],
    scanned: Scan,
    *,
    closed: bool,
    updated_at: int | None,
    source: str,
    event_id: Any,
    memo: Memo | None = None,
) -> StageOutcome:
    """Evaluate an entry on a stage from its clean fixes in the stage window and their
    scan (:func:`scan_segment` over every segment fixes[i]→fixes[i+1]). ``memo`` keeps
    zone :func:`partition` results between calls."""
    ctx = _Context(plan, entry, rules, fixes, source, event_id, Memo() if memo is None else memo)
    crossings, others = scanned
    passes = {order: _passes(found, rules.rearm_s) for order, found in crossings.items()}
    for shape in plan.gates:
        for number, crossing in enumerate(passes.get(shape.order, []), start=1):
            ctx.records.append(_record(ctx, shape, shape.kind, number, crossing))
    start = _start(ctx, passes)
    finish = _first_after(passes, plan.finish, start, None)
    end = finish.ts if finish else plan.stage.closes_at
    validated = 0
    forbidden: list[tuple[Shape, Passage]] = []
    if start is not None:
        validated = _waypoints(ctx, others, start, end, missed=finish is not None or closed)
        forbidden = _zones(ctx, others, start, end)
    result = _result(ctx, start, finish, closed, validated, updated_at)
    running = None if start is None else (start, end)
    return StageOutcome(tuple(ctx.records), tuple(ctx.penalties), result, running, tuple(forbidden))


def scan_segment(
    plan: StagePlan,
    p1: Position,
    p2: Position,
    cells: tuple[tuple[int, int], tuple[int, int]],
    i: int,
    scanned: Scan,
) -> None:
    """Add segment ``i`` (P1→P2, ends in grid ``cells``) to a scan: its gate crossings, and
    its index under each waypoint or zone whose bounding box it meets."""
    c1, c2 = cells
    found = plan.grid.get(c1, plan.everywhere) if c1 == c2 else candidates(plan, c1, c2)
    if not found:
        return
    crossings, others = scanned
    lo_lat, hi_lat = (p1.lat, p2.lat) if p1.lat <= p2.lat else (p2.lat, p1.lat)
    lo_lon, hi_lon = (p1.lon, p2.lon) if p1.lon <= p2.lon else (p2.lon, p1.lon)
    for shape in found:
        if (
            hi_lat < shape.min_lat
            or lo_lat > shape.max_lat
            or hi_lon < shape.min_lon
            or lo_lon > shape.max_lon
        ):
            continue
        if shape.polygon is None and shape.radius == 0.0:
            crossing = _gate_crossing(shape, p1, p2)
            if crossing is not None:
                crossings.setdefault(shape.order, []).append(crossing)
        else:
            others.setdefault(shape.order, []).append(i)


def scan_lone_fix(plan: StagePlan, fix: Position, scanned: Scan) -> None:
    """A track of one fix: it may still be inside a waypoint circle (marked ``-1``)."""
    cell = cell_of(fix.lat, fix.lon)
    for shape in candidates(plan, cell, cell):
        if shape.radius > 0.0:
            scanned[1].setdefault(shape.order, []).append(-1)


def cell_key(fix: Position) -> tuple[int, int]:
    """The grid cell of a fix."""
    return (math.floor(fix.lon * CELLS_PER_DEGREE), math.floor(fix.lat * CELLS_PER_DEGREE))


def _gate_crossing(shape: Shape, p1: Position, p2: Position) -> Crossing | None:
    plane = shape.plane
    s = gate_fraction(shape.a, shape.b, plane.xy(p1.lat, p1.lon), plane.xy(p2.lat, p2.lon))
    if s is None:
        return None
    return _interpolate(p1, p2, s)


def _interpolate(p1: Position, p2: Position, s: float) -> Crossing:
    ts = round_ms(p1.ts + s * (p2.ts - p1.ts))
    speed = round(p1.speed + s * (p2.speed - p1.speed), 1)
    return Crossing(ts, p1.ts, p2.ts, speed)


def _passes(found: list[Crossing], rearm_s: float) -> list[Crossing]:
    """Counted passes: a crossing closer than ``rearm_s`` to the last counted is jitter."""
    rearm_ms = rearm_s * 1000.0
    counted: list[Crossing] = []
    for crossing in found:
        if not counted or crossing.ts - counted[-1].ts >= rearm_ms:
            counted.append(crossing)
    return counted


def _start(ctx: _Context, passes: dict[int, list[Crossing]]) -> int | None:
    """The start time: gate pass 1, or the scheduled time (jump start checked)."""
    plan = ctx.plan
    gate_passes = passes.get(plan.start.order, []) if plan.start else []
    scheduled = plan.scheduled.get(ctx.entry.id)
    if plan.stage.start_mode != "scheduled" or scheduled is None:
        return gate_passes[0].ts if gate_passes else None
    if not ctx.fixes or ctx.fixes[-1].ts < scheduled:
        return None  # no data since the scheduled time: not (yet) started
    if gate_passes and gate_passes[0].ts < scheduled:
        ctx.penalties.append(
            _penalty(
                ctx,
                plan.start,
                "jump_start",
                1,
                ctx.rules.jump_start_penalty_s,
                {"scheduled_at_ms": scheduled, "crossed_at_ms": gate_passes[0].ts},
            )
        )
    return scheduled


def _first_after(
    passes: dict[int, list[Crossing]], shape: Shape | None, after: int | None, before: int | None
) -> Crossing | None:
    if shape is None or after is None:
        return None
    for crossing in passes.get(shape.order, []):
        if crossing.ts > after and (before is None or crossing.ts < before):
            return crossing
    return None


def _record(
    ctx: _Context,
    shape: Shape,
    kind: str,
    number: int,
    crossing: Crossing,
    distance_m: float | None = None,
) -> TimingRecord:
    gap_ms = crossing.after_ts - crossing.before_ts
    return TimingRecord(
        event_id=ctx.event_id,
        stage_id=ctx.plan.stage.id,
        stage_name=ctx.plan.stage.name,
        entry_id=ctx.entry.id,
        entry_number=ctx.entry.number,
        geofence_id=shape.geofence.id,
        geofence_name=shape.geofence.name,
        kind=kind,
        pass_=number,
        ts=crossing.ts,
        before_ts=crossing.before_ts,
        after_ts=crossing.after_ts,
        method="interpolated" if gap_ms > 0 else "fix",
        distance_m=distance_m,
        speed_kmh=crossing.speed_kmh,
        confidence="high" if gap_ms <= ctx.rules.interpolation_gap_s * 1000 else "low",
        source=ctx.source,
    )


def _penalty(
    ctx: _Context,
    shape: Shape | None,
    reason: str,
    seq: int,
    seconds: float,
    details: dict[str, Any],
) -> Penalty:
    return Penalty(
        stage_id=ctx.plan.stage.id,
        stage_name=ctx.plan.stage.name,
        entry_id=ctx.entry.id,
        entry_number=ctx.entry.number,
        geofence_id=None if shape is None else shape.geofence.id,
        geofence_name=None if shape is None else shape.geofence.name,
        reason=reason,
        seq=seq,
        seconds=seconds,
        details=details,
    )


def _clip(p1: Position, p2: Position, lo: int, hi: int | None) -> tuple[float, float] | None:
    """The part [s_lo, s_hi] of segment p1→p2 inside the time window, or None."""
    if p2.ts < lo or (hi is not None and p1.ts > hi):
        return None
    span = p2.ts - p1.ts
    if span <= 0:
        return 0.0, 0.0
    s_lo = max(0.0, (lo - p1.ts) / span)
    s_hi = 1.0 if hi is None else min(1.0, (hi - p1.ts) / span)
    return (s_lo, s_hi) if s_lo <= s_hi else None


def _segments(ctx: _Context, indexes: list[int]) -> list[tuple[Position, Position]]:
    """Segments (and lone fixes as zero-length segments) for waypoint distances."""
    fixes = ctx.fixes
    max_gap = ctx.rules.max_track_gap_s * 1000
    out: list[tuple[Position, Position]] = []
    for i in indexes:
        if i < 0:
            out.append((fixes[-1 - i], fixes[-1 - i]))
            continue
        p1, p2 = fixes[i], fixes[i + 1]
        if p2.ts - p1.ts <= max_gap:
            out.append((p1, p2))
        else:  # a long gap is not track; its end fixes still count as points
            out.append((p1, p1))
            out.append((p2, p2))
    return out


def _waypoints(
    ctx: _Context, others: dict[int, list[int]], start: int, end: int | None, *, missed: bool
) -> int:
    validated = 0
    for shape in ctx.plan.waypoints:
        indexes = others.get(shape.order, [])
        key = _memo_key(ctx, indexes, start, end)
        held = ctx.memo.visits.get(shape.order)
        if held is not None and held[0] == key:
            visit = held[1]
        else:
            visit = _visit(ctx, shape, indexes, start, end)
            ctx.memo.visits[shape.order] = (key, visit)
        if visit is not None:
            crossing, closest = visit
            ctx.records.append(_record(ctx, shape, "waypoint", 1, crossing, closest))
            validated += 1
        elif missed:
            geofence = shape.geofence
            seconds = (
                geofence.penalty_s
                if geofence.penalty_s is not None
                else ctx.rules.waypoint_penalty_s(geofence.waypoint_type)
            )
            details = {"waypoint_type": geofence.waypoint_type}
            ctx.penalties.append(_penalty(ctx, shape, "missed_waypoint", 1, seconds, details))
    return validated


def _memo_key(ctx: _Context, indexes: list[int], start: int, end: int | None) -> tuple[object, ...]:
    """Same window, same number of candidate segments and same newest one: same answer."""
    if not indexes:
        return (start, end, 0)
    last = indexes[-1]
    fixes = ctx.fixes
    newest = (fixes[-1 - last].ts,) if last < 0 else (fixes[last].ts, fixes[last + 1].ts)
    return (start, end, len(indexes), newest)


def _visit(
    ctx: _Context, shape: Shape, indexes: list[int], start: int, end: int | None
) -> tuple[Crossing, float] | None:
    """The first entry into the waypoint circle and the closest approach, if validated."""
    first: Crossing | None = None
    closest = math.inf
    plane = shape.plane
    for p1, p2 in _segments(ctx, indexes):
        window = _clip(p1, p2, start, end)
        if window is None:
            continue
        xy1 = plane.xy(p1.lat, p1.lon)
        xy2 = plane.xy(p2.lat, p2.lon)
        s_in, distance = circle_visit(shape.radius, xy1, xy2, window[0], window[1])
        if s_in is None:
            continue
        closest = min(closest, distance)
        if first is None:
            first = _interpolate(p1, p2, s_in)
    if first is None:
        return None
    return first, round(closest, 2)


def _zones(
    ctx: _Context, others: dict[int, list[int]], start: int, end: int | None
) -> list[tuple[Shape, Passage]]:
    forbidden: list[tuple[Shape, Passage]] = []
    for shape in ctx.plan.zones:
        indexes = others.get(shape.order, [])
        key = _memo_key(ctx, indexes, start, end)
        held = ctx.memo.passages.get(shape.order)
        if held is not None and held[0] == key:
            passages = held[1]
        else:
            passages = _passages(ctx, shape, indexes, start, end)
            ctx.memo.passages[shape.order] = (key, passages)
        for number, passage in enumerate(passages, start=1):
            ctx.records.append(_record(ctx, shape, "zone_enter", number, passage.enter))
            if passage.exit is not None:
                ctx.records.append(_record(ctx, shape, "zone_exit", number, passage.exit))
            if shape.kind == "forbidden_zone":
                forbidden.append((shape, passage))
                details = {"enter_ms": passage.enter.ts}
                seconds = ctx.rules.forbidden_zone_penalty_s
                ctx.penalties.append(
                    _penalty(ctx, shape, "forbidden_zone", number, seconds, details)
                )
            else:
                _speeding(ctx, shape, number, passage)
    return forbidden


def _passages(
    ctx: _Context, shape: Shape, indexes: list[int], start: int, end: int | None
) -> list[Passage]:
    """Zone passages in the window; re-entries within ``rearm_s`` continue the passage."""
    memo = ctx.memo.pieces
    fixes = ctx.fixes
    found: list[Passage] = []
    enter: Crossing | None = None
    previous = -2
    for i in indexes:
        p1, p2 = fixes[i], fixes[i + 1]
        window = _clip(p1, p2, start, end)
        if window is None:
            continue
        if i != previous + 1 and enter is not None:
            # Segments between were outside the zone's box; leave at the last boundary.
            found.append(Passage(enter, _interpolate(fixes[previous], fixes[previous + 1], 1.0)))
            enter = None
        previous = i
        key = (shape.order, p1.ts, p2.ts)
        pieces = memo.get(key)
        if pieces is None:
            pieces = memo[key] = partition(shape, p1, p2)
        for a, inside in _clip_pieces(pieces, window[0], window[1]):
            if inside and enter is None:
                enter = _interpolate(p1, p2, a)
            elif not inside and enter is not None:
                found.append(Passage(enter, _interpolate(p1, p2, a)))
                enter = None
    if enter is not None:
        found.append(Passage(enter, None))
    return _merge(found, ctx.rules.rearm_s * 1000)


def partition(shape: Shape, p1: Position, p2: Position) -> Pieces:
    """Segment P1→P2 against a zone: the ``s`` where each inside/outside piece starts."""
    assert shape.polygon is not None
    polygon = shape.polygon
    xy1 = shape.plane.xy(p1.lat, p1.lon)
    xy2 = shape.plane.xy(p2.lat, p2.lon)
    cuts = [0.0, *(s for s in polygon.boundary_params(xy1, xy2) if 0.0 < s < 1.0), 1.0]
    pieces: list[tuple[float, bool]] = []
    for a, b in itertools.pairwise(cuts):
        if b <= a:
            continue
        mid = (a + b) / 2
        inside = polygon.contains(
            xy1[0] + mid * (xy2[0] - xy1[0]), xy1[1] + mid * (xy2[1] - xy1[1])
        )
        if not pieces or pieces[-1][1] != inside:
            pieces.append((a, inside))
    return tuple(pieces)


def _clip_pieces(pieces: Pieces, s_lo: float, s_hi: float) -> list[tuple[float, bool]]:
    """The pieces met on [s_lo, s_hi], each with where it starts inside that range."""
    out: list[tuple[float, bool]] = []
    for k, (a, inside) in enumerate(pieces):
        b = pieces[k + 1][0] if k + 1 < len(pieces) else 1.0
        if b < s_lo or a > s_hi or (b == s_lo and k + 1 < len(pieces)):
            continue
        out.append((max(a, s_lo), inside))
    return out


def _merge(passages: list[Passage], rearm_ms: float) -> list[Passage]:
    merged: list[Passage] = []
    for passage in passages:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.exit is not None
            and passage.enter.ts - last.exit.ts < rearm_ms
        ):
            merged[-1] = Passage(last.enter, passage.exit)
        else:
            merged.append(passage)
    return merged


def _speeding(ctx: _Context, shape: Shape, number: int, passage: Passage) -> None:
    limit = float(shape.geofence.speed_limit_kmh or 0.0)
    threshold = limit + ctx.rules.speed_tolerance_kmh
    enter_ts = passage.enter.ts
    exit_ts = passage.exit.ts if passage.exit is not None else None
    fixes = ctx.fixes
    first = bisect.bisect_left(fixes, enter_ts, key=_ts)
    stop = len(fixes) if exit_ts is None else bisect.bisect_right(fixes, exit_ts, key=_ts)
    inside = fixes[first:stop]
    over = [f for f in inside if f.speed > threshold]
    if not over or over[-1].ts - over[0].ts < ctx.rules.speed_zone_min_duration_s * 1000:
        return
    top = max(f.speed for f in over)
    excess = top - threshold
    bands = [band for band in ctx.rules.speed_penalties if excess > band.over_kmh]
    if not bands:
        return
    band = bands[-1]
    details = {
        "max_speed_kmh": top,
        "limit_kmh": limit,
        "excess_kmh": round(excess, 3),
        "band_over_kmh": band.over_kmh,
        "enter_ms": enter_ts,
        "exit_ms": exit_ts,
    }
    ctx.penalties.append(_penalty(ctx, shape, "speeding", number, band.penalty_s, details))


def _result(
    ctx: _Context,
    start: int | None,
    finish: Crossing | None,
    closed: bool,
    validated: int,
    updated_at: int | None,
) -> StageResult:
    penalty_ms = round_ms(sum(p.seconds for p in ctx.penalties) * 1000)
    finish_ts = finish.ts if finish is not None else None
    elapsed = finish_ts - start if finish_ts is not None and start is not None else None
    if elapsed is not None:
        status = "finished"
    elif ctx.entry.status == "withdrawn" or (closed and start is not None):
        status = "dnf"
    elif start is None:
        status = "not_started"
    else:
        status = "running"
    stage = ctx.plan.stage
    return StageResult(
        stage_id=stage.id,
        stage_name=stage.name,
        entry_id=ctx.entry.id,
        entry_number=ctx.entry.number,
        status=status,
        start_ts=start,
        finish_ts=finish_ts,
        elapsed_ms=elapsed,
        penalty_ms=penalty_ms,
        total_ms=None if elapsed is None else elapsed + penalty_ms,
        rank=None,
        class_rank=None,
        gap_ms=None,
        waypoints_validated=validated,
        waypoints_total=len(ctx.plan.waypoints),
        updated_at=updated_at,
    )
