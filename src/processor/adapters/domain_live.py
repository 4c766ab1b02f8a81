"""The race domain in the running service: after each commit, time what the batch changed.

One :class:`LiveEngine` per live event, warmed from stored positions at start (so a
restart, a crash or another instance's earlier work never leaves the tables behind: the
first sync makes them equal a replay). After each positions commit the new records go
through the engine; the (stage, entry) pairs it reports as changed are synced to the
Directus tables in one transaction together with their domain events (outbox), then the
live channel is told. A periodic tick passes ``now`` for stage closures and ``offline``
alerts. Course edits in Directus are picked up by polling a fingerprint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from processor.adapters import domain_store as store
from processor.adapters.domain_store import Change
from processor.adapters.live_views import LiveViews
from processor.core.records import Record
from processor.domain.engine import LiveEngine
from processor.domain.model import Course, Position
from processor.logs import get_logger

if TYPE_CHECKING:
    from processor.service import Runtime

log = get_logger("domain")

COURSE_FINGERPRINT = """
SELECT md5(concat_ws('#',
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM events t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM stages t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM geofences t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM entries t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM start_times t),
  (SELECT string_agg(t.id || ':' || t.imei, '|' ORDER BY t.id) FROM devices t)))
"""
COURSE_POLL_S = 10.0

_EVENT_TYPES = {
    ("timing_records", "created"): ("timing_record.created",),
    ("timing_records", "updated"): ("timing_record.updated",),
    ("penalties", "created"): ("penalty.created",),
    ("stage_results", "created"): ("stage_result.updated",),
    ("stage_results", "updated"): ("stage_result.updated",),
}


def to_position(record: Record) -> Position:
    """The domain's view of a stored record."""
    return Position(
        imei=record.imei,
        ts=record.ts,
        lat=record.lat,
        lon=record.lon,
        alt=record.alt,
        angle=record.angle,
        sat=record.sat,
        speed=record.speed,
        priority=record.priority,
        event_io=record.event_io,
        received_at=record.received_at,
        io=record.io,
    )


@dataclass(slots=True)
class EventRun:
    """One live event: its course, engine and the devices it follows."""

    event_id: int
    course: Course
    engine: LiveEngine
    imeis: frozenset[str]
    entry_ids: dict[int, int] = field(default_factory=dict)  # number -> entry id

    @classmethod
    def build(cls, event_id: int, course: Course) -> EventRun:
        imeis = frozenset(e.imei for e in course.entries if e.imei)
        numbers = {e.number: int(e.id) for e in course.entries}
        return cls(event_id, course, LiveEngine(course, source="live"), imeis, numbers)


def domain_events(changes: Iterable[Change], run: EventRun) -> list[Any]:
    """Outbox events for the changes of one sync (types of docs/events.md)."""
    from processor.adapters.outbox import EventContext, build_event

    numbers = {v: k for k, v in run.entry_ids.items()}
    out = []
    for change in changes:
        context = EventContext(
            event=run.event_id,
            stage=change.row.get("stage"),
            entry=change.row.get("entry"),
            entry_number=numbers.get(change.row.get("entry", -1)),
        )
        for event_type in _types_of(change):
            out.append(build_event(event_type, change.row, context))
    return out


def _types_of(change: Change) -> Sequence[str]:
    if change.table != "anomalies":
        return _EVENT_TYPES.get((change.table, change.action), ())
    if change.action == "created":
        closed = change.row["ended_at"] is not None
        return ("anomaly.opened", "anomaly.closed") if closed else ("anomaly.opened",)
    before = change.before
    if change.action == "updated" and before is not None and before["ended_at"] is None:
        return ("anomaly.closed",) if change.row["ended_at"] is not None else ()
    return ()


class DomainLive:
    """Runs the live events' engines and keeps the result tables in step."""

    def __init__(self, runtime: Runtime) -> None:
        self.pool: asyncpg.Pool = runtime.pool
        self.settings = runtime.settings
        self.views = LiveViews.for_runtime(runtime)
        self.runs: dict[int, EventRun] = {}
        self.fingerprint = ""
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the live events and bring their tables in line with stored positions."""
        async with self.pool.acquire() as conn:
            self.fingerprint = str(await conn.fetchval(COURSE_FINGERPRINT))
            events = await store.live_event_ids(conn)
            runs = {
                event_id: EventRun.build(event_id, await store.load_course(conn, event_id))
                for event_id in events
            }
        for run in runs.values():
            await self._warm(run)
        self.runs = runs
        log.info("domain started", events=sorted(runs))

    async def _warm(self, run: EventRun) -> None:
        async with self.pool.acquire() as conn:
            positions = await store.load_positions(conn, run.course)
        run.engine.add(positions)
        run.engine.tick(_now_ms())
        everything = {(s.id, e.number) for s in run.course.stages for e in run.course.entries}
        await self._write(run, everything)
        await self.views.publish_course(run)

    async def on_commit(self, records: list[Record]) -> None:
        """Post-commit hook: feed new records to the engines, sync what changed."""
        async with self._lock:
            for run in self.runs.values():
                positions = [to_position(r) for r in records if r.imei in run.imeis]
                if not positions:
                    continue
                affected = run.engine.add(positions)
                if affected:
                    await self._write(run, affected)
                await self.views.publish_positions(run, positions)

    async def tick(self) -> None:
        """Advance every engine to now (closures, ``offline``) and sync what changed."""
        async with self._lock:
            now = _now_ms()
            for run in self.runs.values():
                affected = run.engine.tick(now)
                if affected:
                    await self._write(run, affected)

    async def _write(self, run: EventRun, affected: set[tuple[Any, int]]) -> None:
        result = run.engine.result()
        entries = sorted(
            {run.entry_ids[number] for _, number in affected if number in run.entry_ids}
        )
        async with self.pool.acquire() as conn, conn.transaction():
            changes: list[Change] = []
            for stage_id, number in sorted(affected):
                entry_id = run.entry_ids.get(number)
                if entry_id is not None:
                    changes += await store.sync_entry_stage(conn, result, int(stage_id), entry_id)
            for entry_id in entries:
                changes += await store.sync_entry_anomalies(conn, result, run.event_id, entry_id)
            await _record(conn, domain_events(changes, run))
        await self.views.publish_results(run, result, {s for s, _ in affected}, changes)

    async def run_ticks(self, stop: asyncio.Event) -> None:
        """Background task: tick every ``domain_tick_s``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.domain_tick_s)
            if stop.is_set():
                return
            try:
                await self.tick()
            except Exception:  # retried at the next tick; positions are safe meanwhile
                log.exception("domain tick failed")

    async def watch_courses(self, stop: asyncio.Event) -> None:
        """Background task: rebuild the engines when a course changes in Directus."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=COURSE_POLL_S)
            if stop.is_set():
                return
            try:
                async with self.pool.acquire() as conn:
                    fingerprint = str(await conn.fetchval(COURSE_FINGERPRINT))
                if fingerprint != self.fingerprint:
                    log.info("course changed, reloading the live events")
                    async with self._lock:
                        await self.start()
            except Exception:  # the next poll tries again
                log.exception("course reload failed")


async def _record(conn: asyncpg.Connection, events: list[Any]) -> None:
    if not events:
        return
    from processor.adapters.outbox import record_events

    await record_events(conn, events)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def install(runtime: Runtime) -> None:
    """Wire the live domain into the service (unless ``PROCESSOR_DOMAIN_ENABLED=false``)."""
    if not runtime.settings.domain_enabled:
        return
    live = DomainLive(runtime)
    await live.start()
    runtime.hooks.append(("domain", live.on_commit))
    runtime.background.append(live.run_ticks)
    runtime.background.append(live.watch_courses)
