"""The simulated course: one special stage, its route, geofences and entries.

:func:`generate_course` draws a stage from a seeded random generator (a winding track of
10–40 km with a start, splits, a finish, waypoints of every type, speed zones and a
forbidden zone); :func:`load_course` rebuilds a drivable route from a course file of
DOMAIN.md. :meth:`Course.to_file` writes the course file the processor imports. All of it
is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from processor.tools.sim_geo import Plane, Point, Route, smooth

APPROACH_M = 200.0  # route before the start gate: where vehicles wait
RUNOUT_M = 400.0  # route after the finish gate: where vehicles stop
GATE_WIDTH_M = 80.0
FEATURE_GAP_M = 500.0  # minimum route distance between two geofences
WAYPOINT_RADIUS_M: Mapping[str, float] = {
    "WPV": 200.0,
    "WPM": 90.0,
    "WPS": 90.0,
    "WPE": 90.0,
    "WPC": 300.0,
}
CLASSES: tuple[tuple[str, float], ...] = (("T1", 0.5), ("M", 0.35), ("T4", 0.15))
DEFAULT_ORIGIN = (31.0964, -4.0124)  # Merzouga erg, Morocco: western hemisphere on purpose
MODEL = "FMB920"
_FIRST = ("Ana", "Luka", "Marta", "Ivo", "Nora", "Sami", "Lea", "Omar", "Ines", "Jon", "Mia")
_LAST = ("Horvat", "Benali", "Costa", "Novak", "Dubois", "Moreau", "Kovač", "Sanz", "Berg")


class CourseError(ValueError):
    """A course file that cannot be driven: the message says what is missing or wrong."""


@dataclass(frozen=True, slots=True)
class Gate:
    """A start, split or finish line across the route at distance ``s``."""

    kind: str
    name: str
    s: float
    a: Point
    b: Point


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A waypoint circle near the route at distance ``s``."""

    name: str
    s: float
    type: str
    radius_m: float
    center: Point


@dataclass(frozen=True, slots=True)
class Zone:
    """A speed or forbidden zone; ``s0``..``s1`` is the route stretch it covers or flanks."""

    kind: str
    name: str
    s0: float
    s1: float
    ring: tuple[Point, ...]
    limit_kmh: int | None = None


@dataclass(frozen=True, slots=True)
class EntrySpec:
    """One competitor: race number, crew name, class, tracker IMEI and scheduled start."""

    number: int
    name: str
    klass: str
    imei: str
    start_ms: int


@dataclass(slots=True)
class Course:
    """Everything the simulator drives on and the processor times against."""

    plane: Plane
    route: Route
    event_name: str
    stage_name: str
    opens_ms: int
    closes_ms: int
    gates: list[Gate]
    waypoints: list[Waypoint]
    zones: list[Zone]
    entries: list[EntrySpec]
    rules: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"

    @property
    def start_s(self) -> float:
        """Route distance of the start gate."""
        return next(g.s for g in self.gates if g.kind == "start")

    @property
    def finish_s(self) -> float:
        """Route distance of the finish gate."""
        return next(g.s for g in self.gates if g.kind == "finish")

    def speed_zones(self) -> list[Zone]:
        """The speed zones, in route order."""
        return [z for z in self.zones if z.kind == "speed_zone"]

    def to_file(self) -> dict[str, Any]:
        """The course file of DOMAIN.md (event, stages, geofences, entries, start_times)."""
        return course_file(self)


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, the course file's time format."""
    text = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_iso_ms(text: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time (naive means UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CourseError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def make_imei(serial: int) -> str:
    """A valid 15-digit IMEI (Luhn check digit) on a Teltonika-like TAC."""
    body = f"35042406{serial % 1_000_000:06d}"
    total = 0
    for i, ch in enumerate(body):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


# -- generation -----------------------------------------------------------------------


def generate_course(
    rng: random.Random,
    *,
    vehicles: int,
    start_ms: int,
    length_km: float,
    start_interval_ms: int,
    preroll_ms: int,
    origin: tuple[float, float] = DEFAULT_ORIGIN,
) -> Course:
    """A random special stage of ``length_km`` with ``vehicles`` entries starting in turn."""
    length_m = length_km * 1000.0
    route = Route(_track(rng, APPROACH_M + length_m + RUNOUT_M))
    start_s, finish_s = APPROACH_M, APPROACH_M + length_m
    gates = [
        Gate("start", "Start", start_s, *route.gate(start_s, GATE_WIDTH_M)),
        Gate("finish", "Finish", finish_s, *route.gate(finish_s, GATE_WIDTH_M)),
    ]
    splits = 2 if length_km >= 15 else 1
    items = [("split", 0.0)] * splits + [(t, 0.0) for t in WAYPOINT_RADIUS_M]
    items += [("speed_zone", rng.uniform(800, 1500)) for _ in range(2)]
    items += [("forbidden_zone", 400.0)]
    placed = _place(rng, items, start_s + 600, finish_s - 600)
    waypoints, zones = _features(rng, route, placed, gates)
    first_start = start_ms + preroll_ms
    entries = _entries(rng, vehicles, first_start, start_interval_ms)
    last_start = first_start + (vehicles - 1) * start_interval_ms
    closes = last_start + round(length_m / (40 / 3.6) * 1000) + 900_000
    return Course(
        plane=Plane(*origin),
        route=route,
        event_name=f"Simulated rally {rng.randrange(1000, 10000)}",
        stage_name="SS1",
        opens_ms=start_ms,
        closes_ms=closes,
        gates=sorted(gates, key=lambda g: g.s),
        waypoints=waypoints,
        zones=zones,
        entries=entries,
        timezone="Africa/Casablanca",
    )


def _track(rng: random.Random, length: float) -> list[Point]:
    """A winding track: straights and arcs that never turn back on themselves."""
    main = rng.uniform(0, 2 * math.pi)
    heading, x, y = main, 0.0, 0.0
    points: list[Point] = [(x, y)]
    walked = 0.0
    while walked < length:
        if rng.random() < 0.45:
            run = rng.uniform(150, 1500)
            x, y = x + run * math.sin(heading), y + run * math.cos(heading)
            points.append((x, y))
            walked += run
            continue
        radius = rng.uniform(80, 600)
        turn = math.radians(rng.uniform(15, 110))
        drift = (heading - main + math.pi) % (2 * math.pi) - math.pi
        sign = -1.0 if drift > math.radians(30) else 1.0 if drift < -math.radians(30) else 0.0
        if sign == 0.0:
            sign = rng.choice((-1.0, 1.0))
        if abs(drift + sign * turn) > math.radians(80):
            turn = max(0.0, math.radians(80) - abs(drift))
        steps = max(1, int(radius * turn / 5.0))
        for _ in range(steps):
            heading += sign * turn / steps
            x, y = (
                x + radius * turn / steps * math.sin(heading),
                y + radius * turn / steps * math.cos(heading),
            )
            points.append((x, y))
        walked += radius * turn
    return points


def _place(
    rng: random.Random, items: Sequence[tuple[str, float]], lo: float, hi: float
) -> list[tuple[str, float, float]]:
    """Spread items (kind, length) over ``lo``..``hi`` in random order, gaps >= FEATURE_GAP_M."""
    order = [item for item in items if item[0] != "split"]
    rng.shuffle(order)
    splits = [item for item in items if item[0] == "split"]
    for k, item in enumerate(splits, start=1):
        # Splits go at even ranks so that they divide the stage roughly evenly.
        order.insert(round(k * (len(order) + k) / (len(splits) + 1)), item)
    slack = (hi - lo) - sum(length for _, length in order) - FEATURE_GAP_M * (len(order) - 1)
    if slack < 0:
        raise CourseError("the stage is too short for its geofences")
    cuts = sorted(rng.uniform(0, slack) for _ in order)
    placed: list[tuple[str, float, float]] = []
    pos, used = lo, 0.0
    for (kind, length), cut in zip(order, cuts, strict=True):
        pos += cut - used
        used = cut
        placed.append((kind, pos, pos + length))
        pos += length + FEATURE_GAP_M
    return placed


def _features(
    rng: random.Random,
    route: Route,
    placed: Sequence[tuple[str, float, float]],
    gates: list[Gate],
) -> tuple[list[Waypoint], list[Zone]]:
    """Turn placed items into gates (appended to ``gates``), waypoints and zones."""
    waypoints: list[Waypoint] = []
    zones: list[Zone] = []
    for kind, s0, s1 in placed:
        if kind == "split":
            name = f"Split {sum(g.kind == 'split' for g in gates) + 1}"
            gates.append(Gate("split", name, s0, *route.gate(s0, GATE_WIDTH_M)))
        elif kind in WAYPOINT_RADIUS_M:
            radius = WAYPOINT_RADIUS_M[kind]
            center = route.at(s0, rng.uniform(-0.3, 0.3) * radius)
            waypoints.append(Waypoint(kind, s0, kind, radius, center))
        elif kind == "speed_zone":
            limit = rng.choice((30, 50, 60, 80))
            ring = tuple(route.corridor(s0, s1, 60.0))
            name = f"SZ{sum(z.kind == kind for z in zones) + 1} {limit} km/h"
            zones.append(Zone(kind, name, s0, s1, ring, limit))
        else:
            zones.append(
                Zone(kind, "Forbidden zone", s0, s1, tuple(_offside_block(rng, route, s0, s1)))
            )
    ordered = sorted(waypoints, key=lambda w: w.s)
    named = [
        Waypoint(f"WP{n} {w.type}", w.s, w.type, w.radius_m, w.center)
        for n, w in enumerate(ordered, start=1)
    ]
    return named, zones


def _offside_block(rng: random.Random, route: Route, s0: float, s1: float) -> list[Point]:
    """A square beside the route stretch ``s0``..``s1``, 250 m or more from the track."""
    side = rng.choice((-1.0, 1.0))
    mid = (s0 + s1) / 2
    half = (s1 - s0) / 2
    cx, cy = route.at(mid, side * (250.0 + half * math.sqrt(2)))
    ring = [
        (cx - half, cy - half),
        (cx + half, cy - half),
        (cx + half, cy + half),
        (cx - half, cy + half),
    ]
    return [*ring, ring[0]]


def _entries(rng: random.Random, count: int, first_start: int, interval_ms: int) -> list[EntrySpec]:
    """Entries numbered from 1 in start order, classes drawn by share, distinct IMEIs."""
    base = rng.randrange(1_000_000)
    names = [f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(count)]
    classes = rng.choices([c for c, _ in CLASSES], weights=[w for _, w in CLASSES], k=count)
    return [
        EntrySpec(i + 1, names[i], classes[i], make_imei(base + i), first_start + i * interval_ms)
        for i in range(count)
    ]


# -- course file ------------------------------------------------------------------------


def course_file(course: Course) -> dict[str, Any]:
    """Serialise ``course`` as the DOMAIN.md course file (stage referenced by name)."""
    starts_at, ends_at = iso_ms(course.opens_ms), iso_ms(course.closes_ms)
    stage = {
        "name": course.stage_name,
        "sequence": 1,
        "kind": "special",
        "opens_at": starts_at,
        "closes_at": ends_at,
        "start_mode": "scheduled",
        "status": "scheduled",
    }
    entries = [
        {
            "number": e.number,
            "name": e.name,
            "class": e.klass,
            "imei": e.imei,
            "valid_from": starts_at,
            "valid_to": ends_at,
            "status": "active",
        }
        for e in course.entries
    ]
    starts = [
        {"stage": course.stage_name, "entry_number": e.number, "scheduled_at": iso_ms(e.start_ms)}
        for e in course.entries
    ]
    return {
        "event": {
            "name": course.event_name,
            "starts_at": starts_at,
            "ends_at": ends_at,
            "timezone": course.timezone,
            "status": "live",
            "rules": dict(course.rules),
        },
        "stages": [stage],
        "geofences": {"type": "FeatureCollection", "features": _features_geojson(course)},
        "entries": entries,
        "start_times": starts,
    }


def _features_geojson(course: Course) -> list[dict[str, Any]]:
    """Geofences in route order, numbered by ``sequence``."""
    rows: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
    p = course.plane.lonlat
    for g in course.gates:
        geometry: dict[str, Any] = {"type": "LineString", "coordinates": [p(g.a), p(g.b)]}
        rows.append((g.s, geometry, {"kind": g.kind, "name": g.name}))
    for w in course.waypoints:
        geometry = {"type": "Point", "coordinates": p(w.center)}
        props = {
            "kind": "waypoint",
            "name": w.name,
            "radius_m": w.radius_m,
            "waypoint_type": w.type,
        }
        rows.append((w.s, geometry, props))
    for z in course.zones:
        geometry = {"type": "Polygon", "coordinates": [[p(pt) for pt in z.ring]]}
        rows.append(
            (z.s0, geometry, {"kind": z.kind, "name": z.name, "speed_limit_kmh": z.limit_kmh})
        )
    rows.sort(key=lambda row: row[0])
    features = []
    for n, (_, geometry, props) in enumerate(rows, start=1):
        properties = {
            "stage": course.stage_name,
            "kind": props["kind"],
            "name": props["name"],
            "sequence": n,
            "radius_m": props.get("radius_m"),
            "speed_limit_kmh": props.get("speed_limit_kmh"),
            "waypoint_type": props.get("waypoint_type"),
            "penalty_s": None,
        }
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features


def load_course(
    data: Mapping[str, Any], *, start_interval_ms: int = 30_000, vehicles: int | None = None
) -> Course:
    """A drivable :class:`Course` from a course file: the route threads its geofences.

    The route runs from 200 m before the start gate through the splits and waypoints in
    ``sequence`` order to the finish gate and 400 m beyond, with corners rounded. Raises
    :class:`CourseError` when the file has no special stage, start or finish gate.
    """
    try:
        return _load(data, start_interval_ms, vehicles)
    except (KeyError, TypeError, IndexError) as exc:
        raise CourseError(f"malformed course file: {type(exc).__name__}: {exc}") from exc


def _load(data: Mapping[str, Any], interval: int, vehicles: int | None) -> Course:
    stages = sorted(
        (s for s in data["stages"] if s.get("kind", "special") == "special"),
        key=lambda s: s.get("sequence", 0),
    )
    if not stages:
        raise CourseError("the course file has no special stage")
    stage = stages[0]
    feats = [
        f
        for f in data["geofences"]["features"]
        if f["properties"].get("stage")
        in (None, stage["name"], stage.get("sequence"), stage.get("id"))
    ]
    start = _one(feats, "start")
    lon0, lat0 = _mid(start["geometry"]["coordinates"])
    plane = Plane(lat0, lon0)
    route = _threaded_route(plane, feats)
    gates, waypoints, zones = _geofences_on(plane, route, feats)
    entries = _file_entries(data, stage, parse_iso_ms(stage["opens_at"]), interval)
    if vehicles is not None:
        entries = entries[:vehicles]
    event = data.get("event", {})
    return Course(
        plane=plane,
        route=route,
        event_name=str(event.get("name", "Event")),
        stage_name=str(stage["name"]),
        opens_ms=parse_iso_ms(stage["opens_at"]),
        closes_ms=parse_iso_ms(stage["closes_at"]),
        gates=gates,
        waypoints=waypoints,
        zones=zones,
        entries=entries,
        rules=dict(event.get("rules") or {}),
        timezone=str(event.get("timezone", "UTC")),
    )


def _one(feats: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    found = [f for f in feats if f["properties"]["kind"] == kind]
    if not found:
        raise CourseError(f"the stage has no {kind} gate")
    return found[0]


def _mid(coords: Sequence[Sequence[float]]) -> tuple[float, float]:
    (x0, y0), (x1, y1) = coords[0][:2], coords[-1][:2]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _gate_axis(plane: Plane, coords: Sequence[Sequence[float]]) -> tuple[Point, Point]:
    """Midpoint and unit direction of travel of a gate (A is on the left of the travel)."""
    ax, ay = plane.to_xy(coords[0][1], coords[0][0])
    bx, by = plane.to_xy(coords[-1][1], coords[-1][0])
    lx, ly = ax - bx, ay - by
    norm = math.hypot(lx, ly) or 1.0
    return ((ax + bx) / 2, (ay + by) / 2), (ly / norm, -lx / norm)


def _threaded_route(plane: Plane, feats: Sequence[Mapping[str, Any]]) -> Route:
    """Control points through every gate (square to it) and waypoint, corners rounded."""
    (smid, sdir) = _gate_axis(plane, _one(feats, "start")["geometry"]["coordinates"])
    (fmid, fdir) = _gate_axis(plane, _one(feats, "finish")["geometry"]["coordinates"])
    points: list[Point] = [(smid[0] - APPROACH_M * sdir[0], smid[1] - APPROACH_M * sdir[1])]
    points += _gate_points(smid, sdir)
    middle = [f for f in feats if f["properties"]["kind"] in ("split", "waypoint")]
    for f in sorted(middle, key=lambda f: f["properties"].get("sequence") or 0):
        coords = f["geometry"]["coordinates"]
        if f["properties"]["kind"] == "split":
            points += _gate_points(*_gate_axis(plane, coords))
        else:
            points.append(plane.to_xy(coords[1], coords[0]))
    points += _gate_points(fmid, fdir)
    points.append((fmid[0] + RUNOUT_M * fdir[0], fmid[1] + RUNOUT_M * fdir[1]))
    return Route(smooth(points, rounds=4))


def _gate_points(mid: Point, direction: Point) -> list[Point]:
    """Three points crossing a gate square to it, so rounding keeps the crossing straight."""
    return [(mid[0] + k * direction[0], mid[1] + k * direction[1]) for k in (-60.0, 0.0, 60.0)]


def _geofences_on(
    plane: Plane, route: Route, feats: Sequence[Mapping[str, Any]]
) -> tuple[list[Gate], list[Waypoint], list[Zone]]:
    """Locate every geofence of the file along ``route``."""
    gates: list[Gate] = []
    waypoints: list[Waypoint] = []
    zones: list[Zone] = []
    for f in feats:
        props, coords = f["properties"], f["geometry"]["coordinates"]
        kind, name = props["kind"], str(props["name"])
        if kind in ("start", "split", "finish"):
            a = plane.to_xy(coords[0][1], coords[0][0])
            b = plane.to_xy(coords[-1][1], coords[-1][0])
            gates.append(
                Gate(kind, name, route.nearest(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)), a, b)
            )
        elif kind == "waypoint":
            center = plane.to_xy(coords[1], coords[0])
            wtype = str(props.get("waypoint_type") or "WPV")
            radius = float(props.get("radius_m") or WAYPOINT_RADIUS_M.get(wtype, 90.0))
            waypoints.append(Waypoint(name, route.nearest(center), wtype, radius, center))
        elif kind in ("speed_zone", "forbidden_zone"):
            zones.append(
                _zone_on(plane, route, kind, name, coords[0], props.get("speed_limit_kmh"))
            )
    return sorted(gates, key=lambda g: g.s), sorted(waypoints, key=lambda w: w.s), zones


def _zone_on(
    plane: Plane, route: Route, kind: str, name: str, ring_ll: Sequence[Sequence[float]], limit: Any
) -> Zone:
    """A zone with the route stretch inside it (speed zone) or nearest to it (forbidden)."""
    from processor.tools.sim_geo import STEP_M, point_in_ring

    ring = tuple(plane.to_xy(p[1], p[0]) for p in ring_ll)
    inside = [i for i in range(len(route.xs)) if point_in_ring((route.xs[i], route.ys[i]), ring)]
    if inside:
        s0, s1 = inside[0] * STEP_M, inside[-1] * STEP_M
    else:
        cx = sum(p[0] for p in ring) / len(ring)
        cy = sum(p[1] for p in ring) / len(ring)
        s0 = s1 = route.nearest((cx, cy))
    return Zone(kind, name, s0, s1, ring, int(limit) if limit is not None else None)


def _file_entries(
    data: Mapping[str, Any], stage: Mapping[str, Any], opens_ms: int, interval: int
) -> list[EntrySpec]:
    """Entries with an IMEI, their scheduled start on the stage or one by one after opening."""
    # A database export refers to entries by id; a hand-written file by entry_number.
    numbers = {e["id"]: e["number"] for e in data["entries"] if "id" in e}
    scheduled = {
        st["entry_number"] if "entry_number" in st else numbers.get(st["entry"], st["entry"]): (
            parse_iso_ms(st["scheduled_at"])
        )
        for st in data.get("start_times", [])
        if st.get("stage") in (stage["name"], stage.get("sequence"), stage.get("id"))
    }
    entries = []
    active = [e for e in data["entries"] if e.get("status", "active") == "active" and e.get("imei")]
    for n, e in enumerate(sorted(active, key=lambda e: e["number"])):
        start = scheduled.get(e["number"], opens_ms + 60_000 + n * interval)
        entries.append(
            EntrySpec(
                int(e["number"]),
                str(e.get("name", "")),
                str(e.get("class", "T1")),
                str(e["imei"]),
                start,
            )
        )
    if not entries:
        raise CourseError("the course file has no active entry with a device imei")
    return entries
