"""The domain's inputs: positions, rules and the course (one event's configuration).

Everything here is immutable and built from plain data (a course file or rows from the
database); :meth:`Course.from_dict` validates and names the place of any problem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from processor.domain.timeutil import TimeFormatError, format_opt, parse_time_ms

Id = int | str
IoValue = int | bytes

GATE_KINDS: Final = frozenset({"start", "split", "finish"})
ZONE_KINDS: Final = frozenset({"speed_zone", "forbidden_zone"})
GEOFENCE_KINDS: Final = GATE_KINDS | ZONE_KINDS | {"waypoint"}


class CourseError(ValueError):
    """The course file is invalid; the message names the place (``stages[2].kind``)."""


@dataclass(frozen=True, slots=True)
class Position:
    """One record of a device as stored: times in ms UTC, coordinates in degrees.

    ``received_at`` is the ingestion time (use ``ts`` when unknown); ``io`` maps IO ids to
    unsigned integers or raw bytes, as the stream contract delivers them.
    """

    imei: str
    ts: int
    lat: float
    lon: float
    alt: int
    angle: int
    sat: int
    speed: int
    priority: int
    event_io: int
    received_at: int
    io: Mapping[int, IoValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpeedBand:
    """A speeding penalty: ``penalty_s`` when the excess is above ``over_kmh``."""

    over_kmh: float
    penalty_s: float


DEFAULT_WAYPOINT_PENALTIES: Final[Mapping[str, float]] = {
    "default": 900,
    "WPE": 600,
    "WPP": 120,
    "WPN": 3600,
}
DEFAULT_SPEED_BANDS: Final = (
    SpeedBand(0, 60),
    SpeedBand(20, 120),
    SpeedBand(40, 360),
)


@dataclass(frozen=True, slots=True)
class Rules:
    """The event's rules (``events.rules``); every value has DOMAIN.md's default."""

    max_speed_kmh: float = 300
    interpolation_gap_s: float = 10
    max_track_gap_s: float = 60
    rearm_s: float = 30
    missed_waypoint_penalty_s: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_WAYPOINT_PENALTIES)
    )
    speed_tolerance_kmh: float = 0
    speed_zone_min_duration_s: float = 0
    speed_penalties: tuple[SpeedBand, ...] = DEFAULT_SPEED_BANDS
    jump_start_penalty_s: float = 60
    forbidden_zone_penalty_s: float = 600
    stopped_alert_s: float = 180
    offline_after_s: float = 120
    low_battery_pct: float = 20

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "rules") -> Rules:
        """Build rules from ``events.rules`` JSON; absent keys keep their defaults."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise CourseError(f"{where}: must be an object")
        values: dict[str, Any] = {}
        for name in _SCALAR_RULES:
            if name in data:
                values[name] = _number(data[name], f"{where}.{name}", minimum=0)
        if "missed_waypoint_penalty_s" in data:
            values["missed_waypoint_penalty_s"] = _waypoint_penalties(
                data["missed_waypoint_penalty_s"], f"{where}.missed_waypoint_penalty_s"
            )
        if "speed_penalties" in data:
            values["speed_penalties"] = _speed_bands(
                data["speed_penalties"], f"{where}.speed_penalties"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The rules as ``events.rules`` JSON (every key written)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALAR_RULES}
        out["missed_waypoint_penalty_s"] = dict(sorted(self.missed_waypoint_penalty_s.items()))
        out["speed_penalties"] = [
            {"over_kmh": band.over_kmh, "penalty_s": band.penalty_s}
            for band in self.speed_penalties
        ]
        return out

    def waypoint_penalty_s(self, waypoint_type: str | None) -> float:
        """The missed-waypoint penalty for a type, else the ``default`` entry."""
        table = self.missed_waypoint_penalty_s
        if waypoint_type is not None and waypoint_type in table:
            return table[waypoint_type]
        return table.get("default", DEFAULT_WAYPOINT_PENALTIES["default"])


_SCALAR_RULES: Final = (
    "max_speed_kmh",
    "interpolation_gap_s",
    "max_track_gap_s",
    "rearm_s",
    "speed_tolerance_kmh",
    "speed_zone_min_duration_s",
    "jump_start_penalty_s",
    "forbidden_zone_penalty_s",
    "stopped_alert_s",
    "offline_after_s",
    "low_battery_pct",
)


def _waypoint_penalties(value: object, where: str) -> dict[str, float]:
    # Given keys override the defaults; types not named keep theirs.
    if not isinstance(value, Mapping):
        raise CourseError(f"{where}: must be an object of waypoint type to seconds")
    merged = dict(DEFAULT_WAYPOINT_PENALTIES)
    for key, seconds in value.items():
        merged[str(key)] = _number(seconds, f"{where}.{key}", minimum=0)
    return merged


def _speed_bands(value: object, where: str) -> tuple[SpeedBand, ...]:
    if not isinstance(value, list):
        raise CourseError(f"{where}: must be a list of {{over_kmh, penalty_s}}")
    bands = []
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise CourseError(f"{here}: must be an object")
        over = _number(item.get("over_kmh"), f"{here}.over_kmh", minimum=0)
        bands.append(SpeedBand(over, _number(item.get("penalty_s"), f"{here}.penalty_s", 0)))
    return tuple(sorted(bands, key=lambda band: band.over_kmh))


def _number(value: object, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CourseError(f"{where}: must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise CourseError(f"{where}: must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Event:
    """The event: its identity, time frame and rules."""

    id: Id
    name: str
    rules: Rules
    starts_at: int | None = None
    ends_at: int | None = None
    timezone: str | None = None
    status: str = "live"


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage; positions with ``opens_at <= ts <= closes_at`` belong to it."""

    id: Id
    name: str
    sequence: int
    kind: Literal["special", "liaison"] = "special"
    opens_at: int | None = None
    closes_at: int | None = None
    start_mode: Literal["gate", "scheduled"] = "gate"
    status: Literal["scheduled", "open", "closed"] = "open"

    def contains(self, ts: int) -> bool:
        """Whether ``ts`` is inside the stage window (bounds inclusive, None = open)."""
        return (self.opens_at is None or ts >= self.opens_at) and (
            self.closes_at is None or ts <= self.closes_at
        )

    def closed_at(self, now_ms: int | None) -> bool:
        """Whether the stage is closed: by its status, or by ``now`` past ``closes_at``."""
        if self.status == "closed":
            return True
        return now_ms is not None and self.closes_at is not None and now_ms >= self.closes_at


@dataclass(frozen=True, slots=True)
class Geofence:
    """A gate, waypoint or zone; ``geometry`` is GeoJSON (coordinates lon, lat)."""

    id: Id
    kind: str
    name: str
    geometry: Mapping[str, Any]
    stage: Id | None = None
    sequence: int = 0
    radius_m: float | None = None
    speed_limit_kmh: float | None = None
    waypoint_type: str | None = None
    penalty_s: float | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A competitor: number, class and the device that tracks it while valid."""

    id: Id
    number: int
    name: str = ""
    klass: str | None = None
    imei: str | None = None
    valid_from: int | None = None
    valid_to: int | None = None
    status: Literal["active", "withdrawn", "dsq"] = "active"

    def owns(self, ts: int) -> bool:
        """Whether a record of the entry's device at ``ts`` belongs to this entry."""
        return (self.valid_from is None or ts >= self.valid_from) and (
            self.valid_to is None or ts <= self.valid_to
        )


@dataclass(frozen=True, slots=True)
class StartTime:
    """An entry's scheduled start on a stage (``start_mode = scheduled``)."""

    id: Id
    stage: Id
    entry: Id
    scheduled_at: int


@dataclass(frozen=True, slots=True)
class Course:
    """One event's configuration: stages, geofences, entries and start times."""

    event: Event
    stages: tuple[Stage, ...] = ()
    geofences: tuple[Geofence, ...] = ()
    entries: tuple[Entry, ...] = ()
    start_times: tuple[StartTime, ...] = ()

    @property
    def rules(self) -> Rules:
        """The event's rules."""
        return self.event.rules

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Course:
        """Build a course from a course file; :class:`CourseError` names what is wrong."""
        from processor.domain.course_file import course_from_dict

        return course_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The course file of this course (ids included, times ISO 8601 UTC)."""
        return {
            "event": _event_dict(self.event),
            "stages": [_stage_dict(stage) for stage in self.stages],
            "geofences": {
                "type": "FeatureCollection",
                "features": [_geofence_feature(geofence) for geofence in self.geofences],
            },
            "entries": [_entry_dict(entry) for entry in self.entries],
            "start_times": [
                {
                    "id": start.id,
                    "stage": start.stage,
                    "entry": start.entry,
                    "scheduled_at": format_opt(start.scheduled_at),
                }
                for start in self.start_times
            ],
        }


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "name": event.name,
        "starts_at": format_opt(event.starts_at),
        "ends_at": format_opt(event.ends_at),
        "timezone": event.timezone,
        "status": event.status,
        "rules": event.rules.to_dict(),
    }


def _stage_dict(stage: Stage) -> dict[str, Any]:
    return {
        "id": stage.id,
        "name": stage.name,
        "sequence": stage.sequence,
        "kind": stage.kind,
        "opens_at": format_opt(stage.opens_at),
        "closes_at": format_opt(stage.closes_at),
        "start_mode": stage.start_mode,
        "status": stage.status,
    }


def _geofence_feature(geofence: Geofence) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": geofence.id,
        "geometry": dict(geofence.geometry),
        "properties": {
            "id": geofence.id,
            "stage": geofence.stage,
            "kind": geofence.kind,
            "name": geofence.name,
            "sequence": geofence.sequence,
            "radius_m": geofence.radius_m,
            "speed_limit_kmh": geofence.speed_limit_kmh,
            "waypoint_type": geofence.waypoint_type,
            "penalty_s": geofence.penalty_s,
        },
    }


def _entry_dict(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "number": entry.number,
        "name": entry.name,
        "class": entry.klass,
        "imei": entry.imei,
        "valid_from": format_opt(entry.valid_from),
        "valid_to": format_opt(entry.valid_to),
        "status": entry.status,
    }


def time_or_none(value: object, where: str) -> int | None:
    """A course time (ISO 8601 or ms) or ``None``; :class:`CourseError` when invalid."""
    if value is None:
        return None
    try:
        return parse_time_ms(value)
    except TimeFormatError as exc:
        raise CourseError(f"{where}: {exc}") from exc


def ids_in_order(items: Sequence[Mapping[str, Any]], key: str = "id") -> list[Id]:
    """Each item's id, or a generated one: after the largest integer id, in list order."""
    numbers = [item.get(key) for item in items]
    next_id = max((n for n in numbers if isinstance(n, int) and not isinstance(n, bool)), default=0)
    out: list[Id] = []
    for value in numbers:
        if isinstance(value, int | str) and not isinstance(value, bool):
            out.append(value)
        else:
            next_id += 1
            out.append(next_id)
    return out


def unique(values: Iterable[Id], where: str) -> None:
    """Raise :class:`CourseError` naming the first repeated id."""
    seen: set[Id] = set()
    for value in values:
        if value in seen:
            raise CourseError(f"{where}: id {value!r} is used twice")
        seen.add(value)


# The output rows live in processor.domain.rows; importable from here as well.
from processor.domain.rows import (  # noqa: E402 - after Id, which rows mirrors
    Anomaly,
    DomainResult,
    OverallStanding,
    Penalty,
    StageResult,
    TimingRecord,
)

__all__ = [
    "Anomaly",
    "Course",
    "CourseError",
    "DomainResult",
    "Entry",
    "Event",
    "Geofence",
    "Id",
    "IoValue",
    "OverallStanding",
    "Penalty",
    "Position",
    "Rules",
    "SpeedBand",
    "Stage",
    "StageResult",
    "StartTime",
    "TimingRecord",
]
