"""A course prepared for evaluation: geofences in their planes, a grid index, lookups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from processor.domain.geometry import M_PER_DEG, XY, Plane, PolygonShape, polygon_rings
from processor.domain.model import GATE_KINDS, ZONE_KINDS, Course, Entry, Geofence, Id, Stage

CELLS_PER_DEGREE: Final = 100  # grid cells of 0.01° (about 1.1 km north-south)
_MAX_CELLS: Final = 4096  # bigger geofences are checked against every segment
_KIND_ORDER: Final = {"start": 0, "split": 1, "finish": 2, "waypoint": 3}


@dataclass(frozen=True, slots=True)
class Shape:
    """A geofence ready for geometry: plane, degree bounding box and its shape."""

    geofence: Geofence
    order: int
    plane: Plane
    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float
    a: XY = (0.0, 0.0)
    b: XY = (0.0, 0.0)
    radius: float = 0.0
    polygon: PolygonShape | None = None

    @property
    def kind(self) -> str:
        """The geofence kind."""
        return self.geofence.kind


def compile_shape(geofence: Geofence, order: int) -> Shape:
    """Project a geofence into the plane centred on it and bound it in degrees."""
    geometry = geofence.geometry
    coords = geometry["coordinates"]
    if geofence.kind in GATE_KINDS:
        (lon_a, lat_a), (lon_b, lat_b) = coords[0][:2], coords[-1][:2]
        lon0, min_lon, max_lon = lon_span([lon_a, lon_b])
        plane = Plane.at((lat_a + lat_b) / 2, lon0)
        return Shape(
            geofence, order, plane, min(lat_a, lat_b), max(lat_a, lat_b), min_lon, max_lon,
            a=plane.xy(lat_a, lon_a), b=plane.xy(lat_b, lon_b),
        )  # fmt: skip
    if geofence.kind == "waypoint":
        lon, lat = float(coords[0]), float(coords[1])
        radius = float(geofence.radius_m or 0.0)
        plane = Plane.at(lat, lon)
        dlat = radius / M_PER_DEG * 1.001
        dlon = radius / max(plane.kx, 1e-9) * 1.001
        _, min_lon, max_lon = lon_span([lon - dlon, lon + dlon])
        return Shape(
            geofence, order, plane, lat - dlat, lat + dlat, min_lon, max_lon, radius=radius
        )
    rings = polygon_rings(geometry["type"], coords)
    lats = [lat for ring in rings for _, lat in ring]
    lon0, min_lon, max_lon = lon_span([lon for ring in rings for lon, _ in ring])
    plane = Plane.at((min(lats) + max(lats)) / 2, lon0)
    shape = PolygonShape(tuple(tuple(plane.xy(lat, lon) for lon, lat in ring) for ring in rings))
    return Shape(geofence, order, plane, min(lats), max(lats), min_lon, max_lon, polygon=shape)


def lon_span(lons: list[float]) -> tuple[float, float, float]:
    """Centre, west and east bounds of nearby longitudes; across the antimeridian the
    bounds are the whole circle (-180, 180), so that every segment is checked exactly."""
    first = lons[0]
    offsets = [_wrap(lon - first) for lon in lons]
    west = first + min(offsets)
    east = first + max(offsets)
    centre = _wrap(first + (min(offsets) + max(offsets)) / 2)
    if west < -180.0 or east > 180.0:
        return centre, -180.0, 180.0
    return centre, west, east


def _wrap(lon: float) -> float:
    if lon > 180.0:
        return lon - 360.0
    if lon < -180.0:
        return lon + 360.0
    return lon


def cell_of(lat: float, lon: float) -> tuple[int, int]:
    """The grid cell of a point."""
    return math.floor(lon * CELLS_PER_DEGREE), math.floor(lat * CELLS_PER_DEGREE)


@dataclass(slots=True)
class StagePlan:
    """A stage's geofences by role and a grid of which shapes may touch each cell."""

    stage: Stage
    shapes: tuple[Shape, ...]
    start: Shape | None
    finish: Shape | None
    gates: tuple[Shape, ...]
    splits: tuple[Shape, ...]
    waypoints: tuple[Shape, ...]
    zones: tuple[Shape, ...]
    scheduled: dict[Id, int]
    grid: dict[tuple[int, int], tuple[Shape, ...]] = field(default_factory=dict)
    everywhere: tuple[Shape, ...] = ()


def plan_stage(course: Course, stage: Stage) -> StagePlan:
    """Select the stage's geofences (event-wide zones included) and index them."""
    own = [
        g
        for g in course.geofences
        if g.stage == stage.id or (g.stage is None and g.kind in ZONE_KINDS)
    ]
    own.sort(key=lambda g: (_KIND_ORDER.get(g.kind, 4), g.sequence, g.name))
    shapes = tuple(compile_shape(g, i) for i, g in enumerate(own))
    gates = tuple(s for s in shapes if s.kind in GATE_KINDS)
    starts = [s for s in shapes if s.kind == "start"]
    finishes = [s for s in shapes if s.kind == "finish"]
    plan = StagePlan(
        stage=stage,
        shapes=shapes,
        start=starts[0] if starts else None,
        finish=finishes[0] if finishes else None,
        gates=gates,
        splits=tuple(s for s in shapes if s.kind == "split"),
        waypoints=tuple(s for s in shapes if s.kind == "waypoint"),
        zones=tuple(s for s in shapes if s.kind in ZONE_KINDS),
        scheduled={t.entry: t.scheduled_at for t in course.start_times if t.stage == stage.id},
    )
    _index(plan)
    return plan


def _index(plan: StagePlan) -> None:
    cells: dict[tuple[int, int], list[Shape]] = {}
    everywhere = []
    for shape in plan.shapes:
        x0, y0 = cell_of(shape.min_lat, shape.min_lon)
        x1, y1 = cell_of(shape.max_lat, shape.max_lon)
        if (x1 - x0 + 1) * (y1 - y0 + 1) > _MAX_CELLS:
            everywhere.append(shape)
            continue
        for x in range(x0, x1 + 1):
            for y in range(y0, y1 + 1):
                cells.setdefault((x, y), []).append(shape)
    plan.everywhere = tuple(everywhere)
    plan.grid = {cell: tuple(found) + plan.everywhere for cell, found in cells.items()}


@dataclass(slots=True)
class CourseIndex:
    """The course with its stages planned and entries looked up by device."""

    course: Course
    plans: tuple[StagePlan, ...]
    by_imei: dict[str, tuple[Entry, ...]]
    windows: tuple[tuple[float, float], ...] = ()

    @classmethod
    def build(cls, course: Course) -> CourseIndex:
        """Plan every stage and index entries by IMEI."""
        stages = sorted(course.stages, key=lambda s: (s.sequence, s.name))
        by_imei: dict[str, list[Entry]] = {}
        for entry in course.entries:
            if entry.imei is not None:
                by_imei.setdefault(entry.imei, []).append(entry)
        windows = tuple(
            (
                -math.inf if stage.opens_at is None else stage.opens_at,
                math.inf if stage.closes_at is None else stage.closes_at,
            )
            for stage in stages
        )
        return cls(
            course,
            tuple(plan_stage(course, stage) for stage in stages),
            {imei: tuple(found) for imei, found in by_imei.items()},
            windows,
        )

    def in_scope(self, ts: int) -> bool:
        """Whether a time is inside any stage window (the domain looks nowhere else)."""
        for lo, hi in self.windows:  # noqa: SIM110 - a plain loop is twice as fast as any()
            if lo <= ts <= hi:
                return True
        return False


def candidates(plan: StagePlan, c1: tuple[int, int], c2: tuple[int, int]) -> Sequence[Shape]:
    """The shapes that may touch a segment whose ends are in cells ``c1`` and ``c2``."""
    grid = plan.grid
    if c1 == c2:
        return grid.get(c1, plan.everywhere)
    if abs(c1[0] - c2[0]) <= 1 and abs(c1[1] - c2[1]) <= 1:
        found: dict[int, Shape] = {}
        for cell in ((c1[0], c1[1]), (c1[0], c2[1]), (c2[0], c1[1]), (c2[0], c2[1])):
            for shape in grid.get(cell, plan.everywhere):
                found[shape.order] = shape
        return [found[key] for key in sorted(found)]
    return plan.shapes
