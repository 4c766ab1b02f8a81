"""What the live page shows, built from the domain's results and sent to the live channel.

Row shapes are those of docs/gateway.md: leaderboard, standings, alert and position rows.
Publishing is best effort: a Redis hiccup here never holds back the pipeline (the next
update carries the full leaderboard again).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
from redis.exceptions import RedisError

from processor.adapters.live import LivePublisher
from processor.domain.engine import OverallStanding, StageResult, TimingRecord
from processor.domain.model import Course, Entry, Position
from processor.domain.timeutil import format_opt
from processor.logs import get_logger

if TYPE_CHECKING:
    from processor.adapters.domain_store import Change
    from processor.service import Runtime

log = get_logger("live")

_PUBLISH_ERRORS = (RedisError, OSError)
_STATUS_ORDER = {"finished": 0, "running": 1, "dnf": 2, "not_started": 3}


def leaderboard_rows(
    results: Sequence[StageResult], timing: Sequence[TimingRecord], entries: dict[int, Entry]
) -> list[dict[str, Any]]:
    """One stage's leaderboard: finished by rank, then running, dnf, not started."""
    splits: dict[int, list[TimingRecord]] = {}
    for record in timing:
        if record.kind == "split" and record.pass_ == 1:
            splits.setdefault(record.entry_number, []).append(record)
    ordered = sorted(
        results,
        key=lambda r: (_STATUS_ORDER.get(r.status, 9), r.rank or 0, r.entry_number),
    )
    return [
        _leaderboard_row(
            r,
            sorted(splits.get(r.entry_number, []), key=lambda t: t.ts),
            entries.get(r.entry_number),
        )
        for r in ordered
    ]


def _leaderboard_row(
    result: StageResult, splits: list[TimingRecord], entry: Entry | None
) -> dict[str, Any]:
    start = result.start_ts
    return {
        "rank": result.rank,
        "number": result.entry_number,
        "name": entry.name if entry else "",
        "class": entry.klass if entry else None,
        "status": result.status,
        "splits": [
            {
                "name": s.geofence_name,
                "ts": format_opt(s.ts),
                "elapsed_ms": None if start is None else s.ts - start,
            }
            for s in splits
        ],
        "start_ts": format_opt(result.start_ts),
        "finish_ts": format_opt(result.finish_ts),
        "elapsed_ms": result.elapsed_ms,
        "penalty_ms": result.penalty_ms,
        "total_ms": result.total_ms,
        "gap_ms": result.gap_ms,
        "class_rank": result.class_rank,
        "last_split": splits[-1].geofence_name if splits else None,
    }


class LiveViews:
    """Sends an event's views to the live channel (no-op without a publisher)."""

    def __init__(self, publisher: LivePublisher | None) -> None:
        self.publisher = publisher

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> LiveViews:
        return cls(LivePublisher(runtime.redis, runtime.settings.live_prefix))

    async def flush(self) -> None:
        """Send the positions the 1 Hz throttle is still holding (called on each tick)."""
        if self.publisher is None:
            return
        try:
            await self.publisher.flush()
        except _PUBLISH_ERRORS as exc:
            log.warning("live positions flush failed", error=str(exc))

    async def publish_course_of(self, event_id: int, course: Course) -> None:
        """The course geometry (for the map) and the event in the catalog."""
        if self.publisher is None:
            return
        try:
            await self.publisher.publish_course(event_id, course.to_dict()["geofences"])
            await self.publisher.publish_catalog(
                [
                    {
                        "id": event_id,
                        "name": course.event.name,
                        "stages": [{"id": s.id, "name": s.name} for s in course.stages],
                    }
                ]
            )
        except _PUBLISH_ERRORS as exc:  # best effort: see module docstring
            log.warning("live course publish failed", error=str(exc))

    async def publish_positions_of(
        self, event_id: int, course: Course, positions: Iterable[Position]
    ) -> None:
        """The newest fixes of the entries (the publisher throttles to 1 Hz each)."""
        if self.publisher is None:
            return
        numbers = _numbers(course.entries)
        rows = [
            {
                "number": numbers[p.imei],
                "imei": p.imei,
                "ts": p.ts,
                "lat": p.lat,
                "lon": p.lon,
                "speed": p.speed,
                "angle": p.angle,
            }
            for p in positions
            if p.imei in numbers and p.sat > 0
        ]
        try:
            await self.publisher.publish_positions(event_id, rows)
        except _PUBLISH_ERRORS as exc:
            log.warning("live positions publish failed", error=str(exc))

    async def publish_stages(
        self,
        pool: asyncpg.Pool,
        event_id: int,
        course: Course,
        stages: Sequence[int],
        changes: Sequence[Change],
    ) -> None:
        """Leaderboards of the stages touched, the standings and new or closed alerts.

        Read back from the tables, so they include every instance's entries and ranks.
        """
        if self.publisher is None:
            return
        from processor.adapters.domain_store import stage_view
        from processor.domain.ranking import overall

        entries = {e.number: e for e in course.entries}
        special = {s.id for s in course.stages if s.kind == "special"}
        try:
            async with pool.acquire() as conn:
                views = {s.id: await stage_view(conn, int(s.id)) for s in course.stages}
            for stage_id in stages:
                results, splits = views[stage_id]
                rows = leaderboard_rows(results, splits, entries)
                await self.publisher.publish_leaderboard(stage_id, rows)
            every = [r for results, _ in views.values() for r in results]
            standings = overall(every, list(course.entries), special)
            await self.publisher.publish_standings(event_id, _standings(standings, entries))
            for change in changes:
                if change.table == "anomalies" and change.action in ("created", "updated"):
                    await self.publisher.publish_alert(event_id, _alert(change.row, entries))
        except _PUBLISH_ERRORS as exc:
            log.warning("live results publish failed", error=str(exc))


def _numbers(entries: Iterable[Entry]) -> dict[str, int]:
    return {e.imei: e.number for e in entries if e.imei}


def _standings(
    standings: Sequence[OverallStanding], entries: dict[int, Entry]
) -> list[dict[str, Any]]:
    return [
        {
            "rank": s.rank,
            "number": s.entry_number,
            "name": entries[s.entry_number].name if s.entry_number in entries else "",
            "class": s.klass,
            "stages_finished": s.stages_finished,
            "total_ms": s.total_ms,
            "gap_ms": s.gap_ms,
        }
        for s in standings
    ]


def _alert(row: dict[str, Any], entries: dict[int, Entry]) -> dict[str, Any]:
    number = next((n for n, e in entries.items() if int(e.id) == row["entry"]), None)
    return {
        "kind": row["kind"],
        "severity": row["severity"],
        "number": number,
        "device_imei": row["device_imei"],
        "started_at": row["started_at"].isoformat() if row["started_at"] else None,
        "ended_at": row["ended_at"].isoformat() if row["ended_at"] else None,
        "details": row["details"],
    }
