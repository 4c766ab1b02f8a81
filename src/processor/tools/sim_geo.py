"""Plane geometry for the simulator: a local metric plane and a route polyline.

The simulator moves vehicles in metres on a local equirectangular plane (the one DOMAIN.md
uses for geofences) and converts to WGS84 only when it writes a record. A
:class:`Route` is a densified polyline with its cumulative distance, heading and
curvature radius at every vertex, so a vehicle's position is a lookup by distance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

EARTH_RADIUS_M = 6_371_008.8
STEP_M = 5.0  # vertex spacing of a densified route
STRAIGHT_RADIUS_M = 1e6  # "no corner"

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Plane:
    """A local equirectangular plane centred on ``(lat0, lon0)``; x east, y north, metres."""

    lat0: float
    lon0: float

    def to_latlon(self, x: float, y: float) -> tuple[float, float]:
        """The WGS84 coordinates of plane point ``(x, y)``."""
        lat = self.lat0 + math.degrees(y / EARTH_RADIUS_M)
        lon = self.lon0 + math.degrees(x / (EARTH_RADIUS_M * math.cos(math.radians(self.lat0))))
        return lat, lon

    def to_xy(self, lat: float, lon: float) -> Point:
        """The plane point of WGS84 coordinates ``(lat, lon)``."""
        y = math.radians(lat - self.lat0) * EARTH_RADIUS_M
        x = math.radians(lon - self.lon0) * EARTH_RADIUS_M * math.cos(math.radians(self.lat0))
        return x, y

    def lonlat(self, point: Point) -> list[float]:
        """A GeoJSON position ``[lon, lat]`` rounded to the wire's 1e-7 degrees."""
        lat, lon = self.to_latlon(*point)
        return [round(lon, 7), round(lat, 7)]


def heading_deg(dx: float, dy: float) -> float:
    """Compass heading of a direction: 0 = north, clockwise, in [0, 360)."""
    return math.degrees(math.atan2(dx, dy)) % 360.0


class Route:
    """A polyline densified to :data:`STEP_M`, indexed by distance from its first vertex."""

    __slots__ = ("headings", "length", "nx", "ny", "radii", "xs", "ys")

    def __init__(self, points: Sequence[Point]) -> None:
        dense = densify(points, STEP_M)
        self.xs = [p[0] for p in dense]
        self.ys = [p[1] for p in dense]
        self.length = STEP_M * (len(dense) - 1)
        self.nx: list[float] = []
        self.ny: list[float] = []
        self.headings: list[float] = []
        for i in range(len(dense)):
            j, k = max(0, i - 1), min(len(dense) - 1, i + 1)
            dx, dy = self.xs[k] - self.xs[j], self.ys[k] - self.ys[j]
            norm = math.hypot(dx, dy) or 1.0
            # Left normal of the direction of travel.
            self.nx.append(-dy / norm)
            self.ny.append(dx / norm)
            self.headings.append(heading_deg(dx, dy))
        self.radii = _radii(self.xs, self.ys, span=4)

    def index(self, s: float) -> int:
        """The vertex at or just before distance ``s`` (clamped to the route)."""
        return min(len(self.xs) - 1, max(0, int(s / STEP_M)))

    def at(self, s: float, lateral: float = 0.0) -> Point:
        """The point at distance ``s``, shifted ``lateral`` metres to the left."""
        i = self.index(s)
        if i >= len(self.xs) - 1:
            return self.xs[-1] + lateral * self.nx[-1], self.ys[-1] + lateral * self.ny[-1]
        f = (s - i * STEP_M) / STEP_M
        x = self.xs[i] + f * (self.xs[i + 1] - self.xs[i]) + lateral * self.nx[i]
        y = self.ys[i] + f * (self.ys[i + 1] - self.ys[i]) + lateral * self.ny[i]
        return x, y

    def nearest(self, point: Point) -> float:
        """Distance along the route of the vertex nearest to ``point``."""
        px, py = point
        best = min(
            range(len(self.xs)), key=lambda i: (self.xs[i] - px) ** 2 + (self.ys[i] - py) ** 2
        )
        return best * STEP_M

    def min_distance(self, point: Point) -> float:
        """Distance in metres from ``point`` to the nearest route vertex."""
        px, py = point
        return math.sqrt(
            min((x - px) ** 2 + (y - py) ** 2 for x, y in zip(self.xs, self.ys, strict=True))
        )

    def gate(self, s: float, width: float) -> tuple[Point, Point]:
        """A gate line A→B across the route at ``s``, A on the competitor's left."""
        return self.at(s, width / 2), self.at(s, -width / 2)

    def corridor(self, s0: float, s1: float, half_width: float) -> list[Point]:
        """A closed polygon ring covering the route from ``s0`` to ``s1``, ``half_width`` wide."""
        count = max(2, int((s1 - s0) / 50.0) + 1)
        stations = [s0 + (s1 - s0) * k / (count - 1) for k in range(count)]
        left = [self.at(s, half_width) for s in stations]
        right = [self.at(s, -half_width) for s in reversed(stations)]
        ring = left + right
        return [*ring, ring[0]]


def densify(points: Sequence[Point], step: float) -> list[Point]:
    """Resample a polyline at a constant ``step`` along its length."""
    out: list[Point] = [points[0]]
    carry = 0.0  # distance already walked past the last emitted point
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = step - carry
        while pos <= seg:
            f = pos / seg
            out.append((x0 + f * (x1 - x0), y0 + f * (y1 - y0)))
            pos += step
        carry = seg - (pos - step)
    return out


def smooth(points: Sequence[Point], rounds: int = 3) -> list[Point]:
    """Chaikin corner cutting, keeping both end points: sharp vertices become curves."""
    out = list(points)
    for _ in range(rounds):
        cut: list[Point] = [out[0]]
        for (x0, y0), (x1, y1) in itertools.pairwise(out):
            cut.append((0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1))
            cut.append((0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1))
        cut.append(out[-1])
        out = cut
    return out


def _radii(xs: Sequence[float], ys: Sequence[float], span: int) -> list[float]:
    """Radius of the circle through the vertices ``span`` before and after each vertex."""
    n = len(xs)
    radii = [STRAIGHT_RADIUS_M] * n
    for i in range(span, n - span):
        ax, ay, bx, by = xs[i - span], ys[i - span], xs[i], ys[i]
        cx, cy = xs[i + span], ys[i + span]
        area2 = abs((bx - ax) * (cy - ay) - (by - ay) * (cx - ax))
        if area2 < 1e-6:
            continue
        a = math.hypot(bx - ax, by - ay)
        b = math.hypot(cx - bx, cy - by)
        c = math.hypot(cx - ax, cy - ay)
        radii[i] = min(STRAIGHT_RADIUS_M, a * b * c / (2.0 * area2))
    return radii


def point_in_ring(point: Point, ring: Sequence[Point]) -> bool:
    """Even-odd test of ``point`` against a closed polygon ring."""
    px, py = point
    inside = False
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside
