"""Southern and western hemispheres, and a gate across the antimeridian."""

from __future__ import annotations

from dataclasses import replace

import pytest

from processor.domain.engine import evaluate
from processor.domain.model import Course
from tests.domain.helpers import T0, fix, lonlat


def _course(origin: tuple[float, float]) -> Course:
    def gate(kind: str, y: float) -> dict:
        coordinates = [_wrap(lonlat(-50, y, origin)), _wrap(lonlat(50, y, origin))]
        return {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": coordinates},
            "properties": {"kind": kind, "name": kind, "stage": 1},
        }

    return Course.from_dict(
        {
            "event": {"id": 1},
            "stages": [{"id": 1, "name": "SS", "opens_at": T0, "closes_at": T0 + 3_600_000}],
            "geofences": {
                "type": "FeatureCollection",
                "features": [gate("start", 0), gate("finish", 1000)],
            },
            "entries": [{"id": 1, "number": 1, "imei": "356307042441013"}],
        }
    )


@pytest.mark.parametrize(
    "origin",
    [
        (-34.6037, -58.3816),  # Buenos Aires: negative latitude and longitude
        (64.0, -21.9),  # Iceland: far north, west
        (-16.5, 179.99999),  # Fiji: the gate straddles the antimeridian
    ],
)
def test_crossing_times_are_exact_anywhere(origin: tuple[float, float]) -> None:
    fixes = [fix(0, -5.0 + 10 * i, 1000 * i, origin=origin) for i in range(102)]
    fixes = [p if p.lon <= 180 else _wrapped(p) for p in fixes]
    result = evaluate(_course(origin), fixes)
    (row,) = result.stage_results
    assert (row.status, row.start_ts, row.finish_ts) == ("finished", T0 + 500, T0 + 100_500)
    assert [a.kind for a in result.anomalies] == []


def _wrap(point: list[float]) -> list[float]:
    return [point[0] - 360 if point[0] > 180 else point[0], point[1]]


def _wrapped(position):
    return replace(position, lon=position.lon - 360)
