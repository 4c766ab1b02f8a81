"""The replay output: deterministic JSON (DOMAIN.md) and a table for people."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from processor.domain.rows import Anomaly, DomainResult, Penalty, StageResult, TimingRecord
from processor.domain.timeutil import format_ms, format_opt


def to_json(result: DomainResult) -> bytes:
    """The replay JSON: keys timing_records, penalties, stage_results, anomalies; same
    result → same bytes (rows already sorted, keys in a fixed order, one final newline)."""
    document = {
        "timing_records": [timing_dict(r) for r in result.timing_records],
        "penalties": [penalty_dict(p) for p in result.penalties],
        "stage_results": [stage_result_dict(r) for r in result.stage_results],
        "anomalies": [anomaly_dict(a) for a in result.anomalies],
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def timing_dict(record: TimingRecord) -> dict[str, Any]:
    """A timing record as replay JSON (entry by number, geofence by name)."""
    return {
        "stage": record.stage_name,
        "entry": record.entry_number,
        "geofence": record.geofence_name,
        "kind": record.kind,
        "pass": record.pass_,
        "ts": format_ms(record.ts),
        "before_ts": format_opt(record.before_ts),
        "after_ts": format_opt(record.after_ts),
        "method": record.method,
        "distance_m": record.distance_m,
        "speed_kmh": record.speed_kmh,
        "confidence": record.confidence,
        "source": record.source,
    }


def penalty_dict(penalty: Penalty) -> dict[str, Any]:
    """A penalty as replay JSON; ``*_ms`` times in details are also printed as ISO."""
    return {
        "stage": penalty.stage_name,
        "entry": penalty.entry_number,
        "geofence": penalty.geofence_name,
        "reason": penalty.reason,
        "seq": penalty.seq,
        "seconds": penalty.seconds,
        "details": _details(penalty.details),
    }


def stage_result_dict(result: StageResult) -> dict[str, Any]:
    """A stage result as replay JSON."""
    return {
        "stage": result.stage_name,
        "entry": result.entry_number,
        "status": result.status,
        "start_ts": format_opt(result.start_ts),
        "finish_ts": format_opt(result.finish_ts),
        "elapsed_ms": result.elapsed_ms,
        "penalty_ms": result.penalty_ms,
        "total_ms": result.total_ms,
        "rank": result.rank,
        "class_rank": result.class_rank,
        "gap_ms": result.gap_ms,
        "waypoints_validated": result.waypoints_validated,
        "waypoints_total": result.waypoints_total,
        "updated_at": format_opt(result.updated_at),
    }


def anomaly_dict(anomaly: Anomaly) -> dict[str, Any]:
    """An anomaly as replay JSON."""
    return {
        "entry": anomaly.entry_number,
        "device_imei": anomaly.device_imei,
        "kind": anomaly.kind,
        "severity": anomaly.severity,
        "started_at": format_ms(anomaly.started_at),
        "ended_at": format_opt(anomaly.ended_at),
        "details": _details(anomaly.details),
    }


def _details(details: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(details):
        value = details[key]
        if key.endswith("_ms") and isinstance(value, int):
            out[key[:-3] + "_at"] = format_ms(value)
        else:
            out[key] = value
    return out


def duration(ms: int | None) -> str:
    """Milliseconds as ``h:mm:ss.mmm`` (empty for None)."""
    if ms is None:
        return ""
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{sign}{hours}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def to_table(result: DomainResult) -> str:
    """Stage results, overall standings, penalties and anomalies as plain-text tables."""
    parts = [_stage_table(result), _overall_table(result)]
    parts.append(
        _table(
            ["stage", "entry", "reason", "geofence", "seq", "seconds"],
            [
                [p.stage_name, p.entry_number, p.reason, p.geofence_name or "", p.seq, p.seconds]
                for p in result.penalties
            ],
            "Penalties",
        )
    )
    parts.append(
        _table(
            ["entry", "imei", "kind", "severity", "started", "ended"],
            [
                [
                    a.entry_number,
                    a.device_imei,
                    a.kind,
                    a.severity,
                    format_ms(a.started_at),
                    format_opt(a.ended_at) or "",
                ]
                for a in result.anomalies
            ],
            "Anomalies",
        )
    )
    return "\n".join(parts)


def _stage_table(result: DomainResult) -> str:
    rows = [
        [
            r.stage_name,
            "" if r.rank is None else r.rank,
            r.entry_number,
            r.status,
            duration(r.elapsed_ms),
            duration(r.penalty_ms),
            duration(r.total_ms),
            duration(r.gap_ms),
            f"{r.waypoints_validated}/{r.waypoints_total}",
        ]
        for r in sorted(
            result.stage_results,
            key=lambda r: (r.stage_name, r.rank is None, r.rank or 0, r.entry_number),
        )
    ]
    header = ["stage", "rank", "entry", "status", "elapsed", "penalty", "total", "gap", "wp"]
    return _table(header, rows, "Stage results")


def _overall_table(result: DomainResult) -> str:
    rows = [
        [
            "" if s.rank is None else s.rank,
            s.entry_number,
            s.klass or "",
            "" if s.class_rank is None else s.class_rank,
            s.stages_finished,
            duration(s.total_ms),
            duration(s.gap_ms),
        ]
        for s in result.overall
    ]
    header = ["rank", "entry", "class", "class rank", "stages", "total", "gap"]
    return _table(header, rows, "Overall")


def _table(header: list[str], rows: list[list[Any]], title: str) -> str:
    cells = [header] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        lines.append("(none)")
    return "\n".join(lines) + "\n"
