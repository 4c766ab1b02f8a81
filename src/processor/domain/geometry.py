"""Plane geometry in a local equirectangular frame centred on each geofence.

x = R·Δλ·cos φ0, y = R·Δφ (metres, R = 6 371 008.8 m). Gates and zones are metres to a
few kilometres wide, where this frame is accurate to centimetres. Segments are
parametrised ``P(s) = P1 + s·(P2 − P1)`` with ``s`` in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

EARTH_RADIUS_M: Final = 6_371_008.8
_RAD: Final = math.pi / 180.0
M_PER_DEG: Final = EARTH_RADIUS_M * _RAD

XY = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Plane:
    """A local frame centred on (lat0, lon0)."""

    lat0: float
    lon0: float
    kx: float
    ky: float

    @classmethod
    def at(cls, lat0: float, lon0: float) -> Plane:
        """The frame centred on a point."""
        return cls(lat0, lon0, M_PER_DEG * math.cos(lat0 * _RAD), M_PER_DEG)

    def xy(self, lat: float, lon: float) -> XY:
        """Project a point (degrees) to metres in this frame."""
        dlon = lon - self.lon0
        if dlon > 180.0:
            dlon -= 360.0
        elif dlon < -180.0:
            dlon += 360.0
        return dlon * self.kx, (lat - self.lat0) * self.ky


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Distance in metres between two nearby points (equirectangular at mid-latitude)."""
    dlon = lon2 - lon1
    if dlon > 180.0:
        dlon -= 360.0
    elif dlon < -180.0:
        dlon += 360.0
    x = dlon * math.cos((lat1 + lat2) * (_RAD / 2))
    return M_PER_DEG * math.hypot(x, lat2 - lat1)


def gate_fraction(a: XY, b: XY, p1: XY, p2: XY) -> float | None:
    """Where segment P1→P2 crosses gate A→B forwards, as ``s`` in (0, 1]; else None.

    Forwards: P1 strictly on the negative side of cross(B−A, P−A), P2 on the
    non-negative side, so a fix lying on the line is counted once (as the arrival).
    """
    dx = b[0] - a[0]
    dy = b[1] - a[1]
    side1 = dx * (p1[1] - a[1]) - dy * (p1[0] - a[0])
    if side1 >= 0.0:
        return None
    side2 = dx * (p2[1] - a[1]) - dy * (p2[0] - a[0])
    if side2 < 0.0:
        return None
    s = side1 / (side1 - side2)
    x = p1[0] + s * (p2[0] - p1[0]) - a[0]
    y = p1[1] + s * (p2[1] - p1[1]) - a[1]
    u = (x * dx + y * dy) / (dx * dx + dy * dy)
    if u < 0.0 or u > 1.0:
        return None
    return s


def circle_visit(
    radius: float, p1: XY, p2: XY, s_lo: float = 0.0, s_hi: float = 1.0
) -> tuple[float | None, float]:
    """For the part ``[s_lo, s_hi]`` of P1→P2 against a circle at the origin: the first
    ``s`` inside the circle (None if never) and the closest approach in metres."""
    dx = p2[0] - p1[0]
    dy = p2[1] - p1[1]
    aa = dx * dx + dy * dy
    bb = p1[0] * dx + p1[1] * dy  # half of the linear coefficient
    s_close = s_lo if aa == 0.0 else min(max(-bb / aa, s_lo), s_hi)
    closest = math.hypot(p1[0] + s_close * dx, p1[1] + s_close * dy)
    if closest > radius:
        return None, closest
    x_lo = p1[0] + s_lo * dx
    y_lo = p1[1] + s_lo * dy
    if x_lo * x_lo + y_lo * y_lo <= radius * radius:
        return s_lo, closest
    cc = p1[0] * p1[0] + p1[1] * p1[1] - radius * radius
    disc = max(bb * bb - aa * cc, 0.0)
    first = (-bb - math.sqrt(disc)) / aa
    return min(max(first, s_lo), s_close), closest


@dataclass(frozen=True, slots=True)
class PolygonShape:
    """A polygon (holes and multi-part allowed) as rings of plane points, even-odd rule."""

    rings: tuple[tuple[XY, ...], ...]

    def contains(self, x: float, y: float) -> bool:
        """Even-odd point-in-polygon (points on an edge may fall either way)."""
        inside = False
        for ring in self.rings:
            count = len(ring)
            for i in range(count):
                x1, y1 = ring[i]
                x2, y2 = ring[(i + 1) % count]
                if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
                    inside = not inside
        return inside

    def boundary_params(self, p1: XY, p2: XY) -> list[float]:
        """The ``s`` values in [0, 1] where segment P1→P2 meets the boundary, sorted."""
        out: list[float] = []
        rx = p2[0] - p1[0]
        ry = p2[1] - p1[1]
        for ring in self.rings:
            count = len(ring)
            for i in range(count):
                ax, ay = ring[i]
                bx, by = ring[(i + 1) % count]
                ex = bx - ax
                ey = by - ay
                denom = rx * ey - ry * ex
                if denom == 0.0:
                    continue
                qx = ax - p1[0]
                qy = ay - p1[1]
                s = (qx * ey - qy * ex) / denom
                u = (qx * ry - qy * rx) / denom
                if 0.0 <= s <= 1.0 and 0.0 <= u <= 1.0:
                    out.append(s)
        out.sort()
        return out


def polygon_rings(geometry_type: str, coordinates: Sequence[object]) -> list[list[XY]]:
    """The rings (lon, lat) of a GeoJSON Polygon or MultiPolygon, closing points dropped."""
    polygons = [coordinates] if geometry_type == "Polygon" else list(coordinates)
    rings: list[list[XY]] = []
    for polygon in polygons:
        assert isinstance(polygon, list)
        for ring in polygon:
            points = [(float(p[0]), float(p[1])) for p in ring]
            if len(points) > 1 and points[0] == points[-1]:
                points.pop()
            if len(points) >= 3:
                rings.append(points)
    return rings
