"""The database side of the race domain: courses and positions in, result rows out.

Shared by the live service (:mod:`processor.adapters.domain_live`) and the database replay
(``processor replay --event``): both load a :class:`Course` from the Directus tables and
positions from ``positions``, and both write the domain's rows by *syncing* one unit (a
stage and entry, or an entry's anomalies) at a time: rows that should exist are inserted
or updated by their natural key, rows that no longer should are deleted. The changes are
returned so the caller can emit domain events in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from processor.adapters.reference import export_course
from processor.domain.engine import Anomaly, DomainResult, Penalty, StageResult, TimingRecord
from processor.domain.model import Course, Position

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PLAUSIBLE_FROM = datetime(2010, 1, 1, tzinfo=UTC)
CLOCK_AHEAD = timedelta(seconds=300)

Row = dict[str, Any]


def as_time(ms: int | None) -> datetime | None:
    """Milliseconds since the epoch as an exact UTC datetime."""
    return None if ms is None else EPOCH + timedelta(milliseconds=ms)


def as_ms(value: datetime) -> int:
    return (value - EPOCH) // timedelta(milliseconds=1)


def _decimal(value: float | None, places: int = 3) -> Decimal | None:
    return None if value is None else Decimal(str(round(value, places)))


async def load_course(conn: asyncpg.Connection, event_id: int) -> Course:
    """The event's course from the Directus tables (ids are the database ids)."""
    return Course.from_dict(await export_course(conn, event_id))


async def live_event_ids(conn: asyncpg.Connection) -> list[int]:
    """Events the live service times: status ``live``."""
    rows = await conn.fetch("SELECT id FROM events WHERE status = 'live' ORDER BY id")
    return [int(r["id"]) for r in rows]


def course_window(course: Course) -> tuple[datetime, datetime] | None:
    """The span of the course's stage windows (None when a stage is open-ended)."""
    opens = [s.opens_at for s in course.stages if s.opens_at is not None]
    closes = [s.closes_at for s in course.stages if s.closes_at is not None]
    if not course.stages or len(opens) < len(course.stages) or len(closes) < len(course.stages):
        return None
    return EPOCH + timedelta(milliseconds=min(opens)), EPOCH + timedelta(milliseconds=max(closes))


_POSITION_COLUMNS = (
    "device_id, (extract(epoch FROM ts) * 1000)::bigint AS ts, lat, lon, alt, angle, satellites,"
    " speed, priority, event_io, (extract(epoch FROM received_at) * 1000)::bigint AS received_at,"
    " io::text AS io"
)


async def load_positions(
    conn: asyncpg.Connection,
    course: Course,
    *,
    imeis: Iterable[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Position]:
    """The stored positions the course's entries own, within its stage windows.

    Records with an implausible clock are placed by ``received_at`` (as the domain does),
    so they are looked up by that too.
    """
    wanted = sorted(set(imeis) if imeis is not None else {e.imei for e in course.entries if e.imei})
    if not wanted:
        return []
    devices = [int(imei) for imei in wanted]
    window = course_window(course)
    lo = since or (window[0] if window else datetime(1970, 1, 1, tzinfo=UTC))
    hi = until or (window[1] if window else datetime(9999, 1, 1, tzinfo=UTC))
    rows = await conn.fetch(
        f"SELECT {_POSITION_COLUMNS} FROM positions"
        " WHERE device_id = ANY($1::bigint[]) AND ts BETWEEN $2 AND $3",
        devices,
        lo,
        hi,
    )
    odd = await conn.fetch(
        f"SELECT {_POSITION_COLUMNS} FROM positions"
        " WHERE device_id = ANY($1::bigint[]) AND received_at BETWEEN $2 AND $3"
        " AND (ts < $4 OR ts > received_at + $5::interval) AND NOT ts BETWEEN $2 AND $3",
        devices,
        lo,
        hi,
        PLAUSIBLE_FROM,
        CLOCK_AHEAD,
    )
    return [position_from_row(r) for r in [*rows, *odd]]


def position_from_row(row: Mapping[str, Any]) -> Position:
    """A domain position from a ``positions`` row (io ids back to integers, hex to bytes)."""
    io: dict[int, int | bytes] = {}
    for key, value in orjson.loads(row["io"]).items():
        io[int(key)] = bytes.fromhex(value) if isinstance(value, str) else int(value)
    return Position(
        imei=f"{row['device_id']:015d}",
        ts=int(row["ts"]),
        lat=float(row["lat"]),
        lon=float(row["lon"]),
        alt=int(row["alt"]),
        angle=int(row["angle"]),
        sat=int(row["satellites"]),
        speed=int(row["speed"]),
        priority=int(row["priority"]),
        event_io=int(row["event_io"]),
        received_at=int(row["received_at"]),
        io=io,
    )


# --- rows as the Directus tables hold them --------------------------------------------------


def timing_row(r: TimingRecord) -> Row:
    return {
        "event": r.event_id,
        "stage": r.stage_id,
        "entry": r.entry_id,
        "geofence": r.geofence_id,
        "kind": r.kind,
        "pass": r.pass_,
        "ts": as_time(r.ts),
        "before_ts": as_time(r.before_ts),
        "after_ts": as_time(r.after_ts),
        "method": r.method,
        "distance_m": _decimal(r.distance_m),
        "speed_kmh": _decimal(r.speed_kmh, 1),
        "confidence": r.confidence,
        "source": r.source,
    }


def penalty_row(p: Penalty) -> Row:
    return {
        "stage": p.stage_id,
        "entry": p.entry_id,
        "geofence": p.geofence_id,
        "reason": p.reason,
        "seq": p.seq,
        "seconds": round(p.seconds),
        "details": dict(p.details),
    }


def result_row(r: StageResult) -> Row:
    return {
        "stage": r.stage_id,
        "entry": r.entry_id,
        "status": r.status,
        "start_ts": as_time(r.start_ts),
        "finish_ts": as_time(r.finish_ts),
        "elapsed_ms": r.elapsed_ms,
        "penalty_ms": r.penalty_ms,
        "total_ms": r.total_ms,
        "rank": r.rank,
        "class_rank": r.class_rank,
        "gap_ms": r.gap_ms,
        "waypoints_validated": r.waypoints_validated,
        "waypoints_total": r.waypoints_total,
        "updated_at": as_time(r.updated_at),
    }


def anomaly_row(a: Anomaly) -> Row:
    return {
        "event": a.event_id,
        "entry": a.entry_id,
        "device_imei": a.device_imei,
        "kind": a.kind,
        "severity": a.severity,
        "started_at": as_time(a.started_at),
        "ended_at": as_time(a.ended_at),
        "details": dict(a.details),
    }


@dataclass(frozen=True, slots=True)
class Table:
    """How one result collection is synced: natural key, and the columns of a unit."""

    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    json_columns: tuple[str, ...] = ()

    def select(self, scope: Sequence[str]) -> str:
        where = " AND ".join(f'"{c}" = ${i}' for i, c in enumerate(scope, 1))
        cols = ", ".join(f'"{c}"' for c in ("id", *self.columns))
        return f"SELECT {cols} FROM {self.name} WHERE {where}"

    def insert(self) -> str:
        cols = ", ".join(f'"{c}"' for c in self.columns)
        marks = ", ".join(self._mark(c, i) for i, c in enumerate(self.columns, 1))
        return f"INSERT INTO {self.name} ({cols}) VALUES ({marks})"

    def update(self) -> str:
        sets = ", ".join(f'"{c}" = {self._mark(c, i)}' for i, c in enumerate(self.columns, 2))
        return f"UPDATE {self.name} SET {sets} WHERE id = $1"

    def _mark(self, column: str, index: int) -> str:
        return f"${index}::jsonb" if column in self.json_columns else f"${index}"

    def values(self, row: Row) -> list[Any]:
        return [
            orjson.dumps(row[c], option=orjson.OPT_SORT_KEYS) if c in self.json_columns else row[c]
            for c in self.columns
        ]


TIMING = Table(
    "timing_records",
    ("stage", "entry", "geofence", "kind", "pass"),
    (
        "event", "stage", "entry", "geofence", "kind", "pass", "ts", "before_ts", "after_ts",
        "method", "distance_m", "speed_kmh", "confidence", "source",
    ),
)  # fmt: skip
PENALTIES = Table(
    "penalties",
    ("stage", "entry", "reason", "geofence", "seq"),
    ("stage", "entry", "geofence", "reason", "seq", "seconds", "details"),
    ("details",),
)
RESULTS = Table(
    "stage_results",
    ("stage", "entry"),
    (
        "stage", "entry", "status", "start_ts", "finish_ts", "elapsed_ms", "penalty_ms",
        "total_ms", "rank", "class_rank", "gap_ms", "waypoints_validated", "waypoints_total",
        "updated_at",
    ),
)  # fmt: skip
# A shard writes its entries' results without ranks; ranks are a stage-wide computation
# (rank_stage_rows) over every entry, whichever instance timed it.
RANK_COLUMNS = ("rank", "class_rank", "gap_ms")
RESULTS_UNRANKED = Table(
    "stage_results", RESULTS.key, tuple(c for c in RESULTS.columns if c not in RANK_COLUMNS)
)
ANOMALIES = Table(
    "anomalies",
    ("device_imei", "kind", "started_at"),
    ("event", "entry", "device_imei", "kind", "severity", "started_at", "ended_at", "details"),
    ("details",),
)


@dataclass(frozen=True, slots=True)
class Change:
    """One row written: ``created``, ``updated`` or ``deleted``, with before and after."""

    table: str
    action: str
    row: Row
    before: Row | None = None


def _same(table: Table, stored: Mapping[str, Any], wanted: Row) -> bool:
    for column in table.columns:
        have, want = stored[column], wanted[column]
        if column in table.json_columns and isinstance(have, bytes | str):
            have = orjson.loads(have)
        if isinstance(have, Decimal) and isinstance(want, Decimal):
            if have != want:
                return False
        elif have != want:
            return False
    return True


async def sync_unit(
    conn: asyncpg.Connection,
    table: Table,
    scope: Mapping[str, Any],
    wanted: Iterable[Row],
    *,
    write: bool = True,
) -> list[Change]:
    """Make the rows of one unit (``scope``) equal ``wanted``; return the changes.

    With ``write=False`` nothing is written: the changes are the difference between what
    is stored and what is wanted (the database replay's report).
    """
    stored_rows = await conn.fetch(table.select(list(scope)), *scope.values())
    stored = {tuple(r[c] for c in table.key): r for r in stored_rows}
    changes: list[Change] = []
    seen: set[tuple[Any, ...]] = set()
    for row in wanted:
        key = tuple(row[c] for c in table.key)
        seen.add(key)
        current = stored.get(key)
        if current is None:
            if write:
                await conn.execute(table.insert(), *table.values(row))
            changes.append(Change(table.name, "created", row))
        elif not _same(table, current, row):
            if write:
                await conn.execute(table.update(), current["id"], *table.values(row))
            changes.append(Change(table.name, "updated", row, plain_row(table, current)))
    for key, current in stored.items():
        if key not in seen:
            if write:
                await conn.execute(f"DELETE FROM {table.name} WHERE id = $1", current["id"])
            changes.append(Change(table.name, "deleted", plain_row(table, current)))
    return changes


def plain_row(table: Table, record: Mapping[str, Any]) -> Row:
    """A stored row of ``table`` as the sync compares it (JSON columns decoded)."""
    row = {c: record[c] for c in table.columns}
    for column in table.json_columns:
        if isinstance(row[column], bytes | str):
            row[column] = orjson.loads(row[column])
    return row


async def sync_entry_stage(
    conn: asyncpg.Connection,
    result: DomainResult,
    stage_id: int,
    entry_id: int,
    *,
    write: bool = True,
    ranked: bool = True,
) -> list[Change]:
    """Sync one entry's timing records, penalties and result on one stage.

    With ``ranked=False`` the rank columns are left to :func:`rank_stage_rows`.
    """
    scope = {"stage": stage_id, "entry": entry_id}
    timing = [
        timing_row(r)
        for r in result.timing_records
        if (r.stage_id, r.entry_id) == (stage_id, entry_id)
    ]
    penalties = [
        penalty_row(p) for p in result.penalties if (p.stage_id, p.entry_id) == (stage_id, entry_id)
    ]
    results = [
        result_row(r)
        for r in result.stage_results
        if (r.stage_id, r.entry_id) == (stage_id, entry_id)
    ]
    changes = await sync_unit(conn, TIMING, scope, timing, write=write)
    changes += await sync_unit(conn, PENALTIES, scope, penalties, write=write)
    results_table = RESULTS if ranked else RESULTS_UNRANKED
    changes += await sync_unit(conn, results_table, scope, results, write=write)
    return changes


async def sync_entry_anomalies(
    conn: asyncpg.Connection,
    result: DomainResult,
    event_id: int,
    entry_id: int,
    *,
    write: bool = True,
) -> list[Change]:
    """Sync one entry's anomalies in one event."""
    wanted = [anomaly_row(a) for a in result.anomalies if a.entry_id == entry_id]
    scope = {"event": event_id, "entry": entry_id}
    return await sync_unit(conn, ANOMALIES, scope, wanted, write=write)


class LeaseLostError(Exception):
    """A newer owner holds the shard: this instance must stop writing for it."""


async def fence(conn: asyncpg.Connection, shard: int, token: int, owner: str) -> None:
    """Inside a write transaction: proceed only while ``token`` is the shard's newest.

    Raises :class:`LeaseLostError` (rolling the transaction back) otherwise.
    """
    row = await conn.fetchval(
        "INSERT INTO processor.domain_shards AS s (shard, token, owner) VALUES ($1, $2, $3)"
        " ON CONFLICT (shard) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner,"
        " updated_at = now() WHERE s.token <= EXCLUDED.token RETURNING token",
        shard,
        token,
        owner,
    )
    if row is None:
        raise LeaseLostError(f"shard {shard}: token {token} is stale")


_STAGE_RESULTS = """
SELECT r.id, r.stage, r.entry, r.status, r.total_ms, r.penalty_ms, r.elapsed_ms, r.start_ts,
       r.finish_ts, r.rank, r.class_rank, r.gap_ms, r.waypoints_validated, r.waypoints_total,
       r.updated_at, e.number, e."class" AS klass, e.status AS entry_status
FROM stage_results r JOIN entries e ON e.id = r.entry
WHERE r.stage = $1
ORDER BY e.number
FOR UPDATE OF r
"""


def _result_from_row(row: Mapping[str, Any]) -> StageResult:
    return StageResult(
        stage_id=row["stage"],
        stage_name="",
        entry_id=row["entry"],
        entry_number=row["number"],
        status=row["status"],
        start_ts=None if row["start_ts"] is None else as_ms(row["start_ts"]),
        finish_ts=None if row["finish_ts"] is None else as_ms(row["finish_ts"]),
        elapsed_ms=row["elapsed_ms"],
        penalty_ms=row["penalty_ms"],
        total_ms=row["total_ms"],
        rank=None,
        class_rank=None,
        gap_ms=None,
        waypoints_validated=row["waypoints_validated"],
        waypoints_total=row["waypoints_total"],
        updated_at=None if row["updated_at"] is None else as_ms(row["updated_at"]),
    )


async def rank_stage_rows(conn: asyncpg.Connection, stage_id: int) -> list[Change]:
    """Recompute one stage's ranks, class ranks and gaps from every entry's stored result.

    The same ranking function as the domain (``rank_stage``), over the rows in the table,
    under a lock on the stage's rows; returns the results whose rank columns changed.
    """
    from processor.domain.model import Entry
    from processor.domain.ranking import rank_stage

    rows = await conn.fetch(_STAGE_RESULTS, stage_id)
    entries = {
        r["entry"]: Entry(
            id=r["entry"], number=r["number"], klass=r["klass"], status=r["entry_status"]
        )
        for r in rows
    }
    ranked = rank_stage([_result_from_row(r) for r in rows], entries)
    changes: list[Change] = []
    for row, result in zip(rows, ranked, strict=True):
        wanted = (result.rank, result.class_rank, result.gap_ms)
        if (row["rank"], row["class_rank"], row["gap_ms"]) == wanted:
            continue
        await conn.execute(
            "UPDATE stage_results SET rank = $2, class_rank = $3, gap_ms = $4 WHERE id = $1",
            row["id"],
            *wanted,
        )
        changes.append(Change("stage_results", "updated", result_row(result)))
    return changes


async def stage_view(
    conn: asyncpg.Connection, stage_id: int
) -> tuple[list[StageResult], list[TimingRecord]]:
    """A stage's stored results (ranked) and split crossings, for the live leaderboard."""
    rows = await conn.fetch(_STAGE_RESULTS.replace("FOR UPDATE OF r", ""), stage_id)
    results = []
    for row in rows:
        base = _result_from_row(row)
        results.append(
            StageResult(
                **{
                    **_fields(base),
                    "rank": row["rank"],
                    "class_rank": row["class_rank"],
                    "gap_ms": row["gap_ms"],
                }
            )
        )
    splits = await conn.fetch(
        "SELECT t.ts, t.before_ts, t.after_ts, t.pass, t.kind, t.stage, t.entry, t.geofence,"
        " g.name AS geofence_name, e.number FROM timing_records t"
        " JOIN geofences g ON g.id = t.geofence JOIN entries e ON e.id = t.entry"
        " WHERE t.stage = $1 AND t.kind = 'split' AND t.pass = 1",
        stage_id,
    )
    timing = [
        TimingRecord(
            event_id=0, stage_id=stage_id, stage_name="", entry_id=r["entry"],
            entry_number=r["number"], geofence_id=r["geofence"], geofence_name=r["geofence_name"],
            kind="split", pass_=1, ts=as_ms(r["ts"]), before_ts=None, after_ts=None, method="",
            distance_m=None, speed_kmh=None, confidence="", source="",
        )
        for r in splits
    ]  # fmt: skip
    return results, timing


def _fields(result: StageResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in result.__dataclass_fields__}
