"""Which records count for timing (fixes) and the removal of GPS spikes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from processor.domain.geometry import M_PER_DEG, distance_m
from processor.domain.model import Position

MIN_PLAUSIBLE_TS: Final = 1_262_304_000_000  # 2010-01-01T00:00:00Z
MAX_CLOCK_AHEAD_MS: Final = 300_000
IO_GNSS_STATUS: Final = 69
_RAD: Final = math.pi / 180.0


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


def remove_spikes(
    fixes: Sequence[Position], max_speed_kmh: float
) -> tuple[list[Position], list[Position]]:
    """Split fixes (sorted by ts, unique ts) into kept fixes and removed spikes.

    Fix *i* is a spike when the speeds from the last kept fix to *i* and from *i* to
    fix *i+1* both exceed the limit while the speed from the last kept fix to *i+1*
    does not. A jump that the next fix confirms fails the last test and is kept.
    """
    limit = max_speed_kmh / 3.6 / 1000.0  # metres per millisecond
    kept: list[Position] = []
    spikes: list[Position] = []
    last = len(fixes) - 1
    # The first test inlined (it runs for every fix): squared degrees against the limit.
    k = _RAD / 2
    per_deg2 = (limit / M_PER_DEG) ** 2
    prev = None
    for i, fix in enumerate(fixes):
        if prev is not None and i < last:
            dlat = fix.lat - prev.lat
            dlon = (fix.lon - prev.lon) * math.cos((fix.lat + prev.lat) * k)
            dt = fix.ts - prev.ts
            fast = dlat * dlat + dlon * dlon > per_deg2 * dt * dt
        else:
            fast = False
        if fast and prev is not None and _too_fast(prev, fix, limit):
            after = fixes[i + 1]
            if _too_fast(fix, after, limit) and not _too_fast(kept[-1], after, limit):
                spikes.append(fix)
                continue
        kept.append(fix)
        prev = fix
    return kept, spikes


def _too_fast(a: Position, b: Position, limit_m_per_ms: float) -> bool:
    return distance_m(a.lat, a.lon, b.lat, b.lon) > limit_m_per_ms * abs(b.ts - a.ts)


def implied_speed_kmh(a: Position, b: Position) -> float:
    """Speed implied by two fixes in km/h (infinite for equal times)."""
    dt = abs(b.ts - a.ts)
    if dt == 0:
        return math.inf
    return distance_m(a.lat, a.lon, b.lat, b.lon) / dt * 3600.0
