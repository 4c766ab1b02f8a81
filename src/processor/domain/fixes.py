"""Which records count for timing (fixes) and the removal of GPS spikes."""

from __future__ import annotations

import math
from typing import Final

from processor.domain.geometry import M_PER_DEG, distance_m
from processor.domain.model import Position

MIN_PLAUSIBLE_TS: Final = 1_262_304_000_000  # 2010-01-01T00:00:00Z
MAX_CLOCK_AHEAD_MS: Final = 300_000
IO_GNSS_STATUS: Final = 69
_HALF_RAD: Final = math.pi / 360.0


def clock_ok(position: Position) -> bool:
    """Whether the record time is plausible: since 2010 and ≤ 300 s after reception."""
    return MIN_PLAUSIBLE_TS <= position.ts <= position.received_at + MAX_CLOCK_AHEAD_MS


def is_fix(position: Position) -> bool:
    """Whether a record is a GNSS fix usable for timing (DOMAIN.md "Which records count")."""
    return has_fix(position) and clock_ok(position)


def has_fix(position: Position) -> bool:
    """:func:`is_fix` except the clock check (for records already known plausible)."""
    lat = position.lat
    lon = position.lon
    if position.sat <= 0 or (lat == 0.0 and lon == 0.0):
        return False
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):  # also false for NaN
        return False
    return position.io.get(IO_GNSS_STATUS, 1) == 1


def spike(before: Position, fix: Position, after: Position, max_speed_kmh: float) -> bool:
    """Whether ``fix`` is a spike between the last kept fix and the next fix."""
    limit = max_speed_kmh / 3.6 / 1000.0  # metres per millisecond
    # A cheap first test (it runs for every fix): squared degrees, no wrap at ±180°
    # (which only overestimates, so a fix it passes is never too fast).
    dlat = fix.lat - before.lat
    dlon = (fix.lon - before.lon) * math.cos((fix.lat + before.lat) * _HALF_RAD)
    dt = fix.ts - before.ts
    if dlat * dlat + dlon * dlon <= (limit / M_PER_DEG) ** 2 * dt * dt:
        return False
    return (
        _too_fast(before, fix, limit)
        and _too_fast(fix, after, limit)
        and not _too_fast(before, after, limit)
    )


def _too_fast(a: Position, b: Position, limit_m_per_ms: float) -> bool:
    return distance_m(a.lat, a.lon, b.lat, b.lon) > limit_m_per_ms * abs(b.ts - a.ts)
