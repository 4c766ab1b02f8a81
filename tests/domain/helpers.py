"""Builders for domain tests: a course laid out in metres around an origin, and fixes.

Points are given in metres east (x) and north (y) of ``ORIGIN`` and converted with the
same equirectangular formula the engine uses, so expectations can be computed by hand.
"""

from __future__ import annotations

import math
from typing import Any

from processor.domain.geometry import M_PER_DEG
from processor.domain.model import Course, Position

ORIGIN = (45.0, 14.0)  # lat, lon
T0 = 1_717_243_200_000  # 2024-06-01T12:00:00Z
IMEI = "356307042441013"


def lonlat(x: float, y: float, origin: tuple[float, float] = ORIGIN) -> list[float]:
    """GeoJSON [lon, lat] of a point x metres east and y metres north of the origin."""
    lat0, lon0 = origin
    return [lon0 + x / (M_PER_DEG * math.cos(math.radians(lat0))), lat0 + y / M_PER_DEG]


def fix(
    x: float,
    y: float,
    t_ms: int,
    *,
    imei: str = IMEI,
    speed: int = 50,
    origin: tuple[float, float] = ORIGIN,
    **fields: Any,
) -> Position:
    """A valid fix at (x, y) metres, ``t_ms`` after T0."""
    lon, lat = lonlat(x, y, origin)
    values: dict[str, Any] = {
        "imei": imei,
        "ts": T0 + t_ms,
        "lat": lat,
        "lon": lon,
        "alt": 120,
        "angle": 0,
        "sat": 9,
        "speed": speed,
        "priority": 0,
        "event_io": 0,
        "received_at": T0 + t_ms + 500,
        "io": {},
    }
    values.update(fields)
    return Position(**values)


def gate(
    kind: str, name: str, x1: float, y1: float, x2: float, y2: float, **props: Any
) -> dict[str, Any]:
    """A gate feature from A (x1, y1) to B (x2, y2)."""
    return feature(
        kind, name, {"type": "LineString", "coordinates": [lonlat(x1, y1), lonlat(x2, y2)]}, **props
    )


def waypoint(name: str, x: float, y: float, radius_m: float, **props: Any) -> dict[str, Any]:
    """A waypoint feature."""
    geometry = {"type": "Point", "coordinates": lonlat(x, y)}
    return feature("waypoint", name, geometry, radius_m=radius_m, waypoint_type="WPV", **props)


def box(
    kind: str, name: str, x1: float, y1: float, x2: float, y2: float, **props: Any
) -> dict[str, Any]:
    """A rectangular zone feature."""
    ring = [lonlat(x1, y1), lonlat(x2, y1), lonlat(x2, y2), lonlat(x1, y2), lonlat(x1, y1)]
    return feature(kind, name, {"type": "Polygon", "coordinates": [ring]}, **props)


def feature(kind: str, name: str, geometry: dict[str, Any], **props: Any) -> dict[str, Any]:
    """A geofence feature on stage 1."""
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"kind": kind, "name": name, "stage": 1, **props},
    }


def course(
    features: list[dict[str, Any]],
    *,
    entries: list[dict[str, Any]] | None = None,
    rules: dict[str, Any] | None = None,
    stage: dict[str, Any] | None = None,
    start_times: list[dict[str, Any]] | None = None,
) -> Course:
    """A one-stage course (stage id 1, open 12:00–18:00) with one entry on IMEI by default."""
    stage_row = {
        "id": 1,
        "name": "SS1",
        "sequence": 1,
        "kind": "special",
        "opens_at": T0 - 3_600_000,
        "closes_at": T0 + 6 * 3_600_000,
        "start_mode": "gate",
        "status": "open",
    }
    stage_row.update(stage or {})
    return Course.from_dict(
        {
            "event": {"id": 7, "name": "Test rally", "rules": rules or {}},
            "stages": [stage_row],
            "geofences": {"type": "FeatureCollection", "features": features},
            "entries": entries
            if entries is not None
            else [{"id": 1, "number": 101, "class": "T1", "imei": IMEI}],
            "start_times": start_times or [],
        }
    )


def straight(
    y_from: float, y_to: float, speed_m_s: float, *, t_from: int = 0, step_ms: int = 1000, **kw: Any
) -> list[Position]:
    """Fixes every ``step_ms`` along x = 0 going north at constant speed."""
    out = []
    t = t_from
    y = y_from
    while y <= y_to + 1e-9:
        out.append(fix(0.0, y, t, **kw))
        t += step_ms
        y += speed_m_s * step_ms / 1000
    return out


def track(
    ys: list[float], step_ms: int, *, t_from: int = 0, x: float = 0.0, **kw: Any
) -> list[Position]:
    """Fixes at (x, y) for each y, ``step_ms`` apart."""
    return [fix(x, y, t_from + i * step_ms, **kw) for i, y in enumerate(ys)]


def ms(t_ms: int) -> int:
    """An absolute time ``t_ms`` after T0."""
    return T0 + t_ms


STANDARD = [
    gate("start", "Start", -50, 0, 50, 0),
    gate("finish", "Finish", -50, 1000, 50, 1000),
]
