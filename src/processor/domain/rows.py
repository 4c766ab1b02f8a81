"""The domain's output rows, one type per Directus collection, plus overall standings.

Each row carries its natural key (DOMAIN.md) both as database ids and as the names people
read (stage name, entry number, geofence name), and every column of its collection except
the database-generated ``id``. Times are milliseconds since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Id = int | str  # as in processor.domain.model (kept here so that model can re-export rows)


@dataclass(frozen=True, slots=True)
class TimingRecord:
    """A gate crossing, a waypoint validation or a zone entry/exit; key (stage, entry,
    geofence, kind, pass)."""

    event_id: Id
    stage_id: Id
    stage_name: str
    entry_id: Id
    entry_number: int
    geofence_id: Id
    geofence_name: str
    kind: str
    pass_: int
    ts: int
    before_ts: int | None
    after_ts: int | None
    method: str
    distance_m: float | None
    speed_kmh: float | None
    confidence: str
    source: str


@dataclass(frozen=True, slots=True)
class Penalty:
    """A time penalty; key (stage, entry, reason, geofence, seq)."""

    stage_id: Id
    stage_name: str
    entry_id: Id
    entry_number: int
    geofence_id: Id | None
    geofence_name: str | None
    reason: str
    seq: int
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StageResult:
    """An entry's result on a stage; key (stage, entry)."""

    stage_id: Id
    stage_name: str
    entry_id: Id
    entry_number: int
    status: str
    start_ts: int | None
    finish_ts: int | None
    elapsed_ms: int | None
    penalty_ms: int
    total_ms: int | None
    rank: int | None
    class_rank: int | None
    gap_ms: int | None
    waypoints_validated: int
    waypoints_total: int
    updated_at: int | None


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A safety alert; key (device_imei, kind, started_at); ``ended_at`` None = ongoing."""

    event_id: Id
    entry_id: Id
    entry_number: int
    device_imei: str
    kind: str
    severity: str
    started_at: int
    ended_at: int | None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OverallStanding:
    """An entry's overall standing: special stages finished and the sum of their totals."""

    entry_id: Id
    entry_number: int
    klass: str | None
    stages_finished: int
    total_ms: int
    penalty_ms: int
    rank: int | None
    class_rank: int | None
    gap_ms: int | None


@dataclass(frozen=True, slots=True)
class DomainResult:
    """Everything the domain derives from a course and positions, sorted deterministically."""

    timing_records: tuple[TimingRecord, ...] = ()
    penalties: tuple[Penalty, ...] = ()
    stage_results: tuple[StageResult, ...] = ()
    anomalies: tuple[Anomaly, ...] = ()
    overall: tuple[OverallStanding, ...] = ()
