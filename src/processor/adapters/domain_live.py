"""The race domain in the running service, sharded by device across instances.

Any instance may store a batch of positions; the domain work for a device is done by the
one instance that holds its shard's lease (device affinity, in order). After the positions
commit, and before the entries are acknowledged, the storing instance appends the new
records to their shard's work stream (``{stream}:domain:{shard}``). The shard's owner
reads that stream (consumer group ``domain``), feeds its engines (one
:class:`LiveEngine` per live event and shard), syncs the changed (stage, entry) units to
the Directus tables with their outbox events in one fenced transaction, re-ranks the
stages touched, tells the live channel, then acknowledges. When an owner dies its leases
expire; the next owner warms its engines from the stored positions, re-reads the work
still pending and carries on. docs/scaling.md has the model and its guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from processor.adapters import domain_store as store
from processor.adapters.domain_store import Change, LeaseLostError
from processor.adapters.leases import Leases
from processor.adapters.live_views import LiveViews
from processor.core.jsonenc import io_json
from processor.core.records import Record
from processor.core.sharding import shard_of
from processor.domain.engine import LiveEngine
from processor.domain.model import Course, Position
from processor.logs import get_logger
from processor.settings import Settings

if TYPE_CHECKING:
    from processor.service import Runtime

log = get_logger("domain")

SHARDS_OWNED = Gauge("processor_domain_shards_owned", "Domain shards this instance holds")
LEASE_CHANGES = Counter(
    "processor_domain_lease_changes_total", "Shard leases gained or given up", ["change"]
)
ROWS_SYNCED = Counter(
    "processor_domain_rows_total", "Result rows written by the domain", ["table", "action"]
)
WORK_SECONDS = Histogram(
    "processor_domain_work_seconds",
    "Time to time one shard's work item batch (engine, sync, ranking, live)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WORK_LAG = Gauge("processor_domain_work_pending", "Work items waiting in the owned shards' streams")
DOMAIN_ERRORS = Counter("processor_domain_errors_total", "Failed domain steps", ["step"])

GROUP = "domain"
CONSUMER = "owner"  # one name for every owner: a new owner's pending entries are its own
COURSE_POLL_S = 10.0
_RANK_LOCK = 0x72616E6B  # advisory lock namespace of stage ranking: "rank"
COURSE_FINGERPRINT = """
SELECT md5(concat_ws('#',
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM events t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM stages t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM geofences t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM entries t),
  (SELECT string_agg(t::text, '|' ORDER BY t.id) FROM start_times t),
  (SELECT string_agg(t.id || ':' || t.imei, '|' ORDER BY t.id) FROM devices t)))
"""
_EVENT_TYPES = {
    ("timing_records", "created"): ("timing_record.created",),
    ("timing_records", "updated"): ("timing_record.updated",),
    ("penalties", "created"): ("penalty.created",),
    ("stage_results", "created"): ("stage_result.updated",),
    ("stage_results", "updated"): ("stage_result.updated",),
}


# --- work items: positions on the shard streams ---------------------------------------------


def encode_positions(records: Sequence[Record]) -> bytes:
    """Records as a compact JSON array (io as stored: integers exact, bytes as hex)."""
    rows = [
        [r.imei, r.ts, r.lat, r.lon, r.alt, r.angle, r.sat, r.speed, r.priority, r.event_io,
         r.received_at, orjson.Fragment(io_json(r.io))]
        for r in records
    ]  # fmt: skip
    return orjson.dumps(rows)


def decode_positions(data: bytes) -> list[Position]:
    """The positions of one work item."""
    out = []
    for row in orjson.loads(data):
        io = {
            int(k): bytes.fromhex(v) if isinstance(v, str) else int(v) for k, v in row[11].items()
        }
        out.append(Position(*row[:11], io=io))  # type: ignore[misc]
    return out


def shard_stream(settings: Settings, shard: int) -> str:
    return f"{settings.stream}:domain:{shard}"


# --- outbox events of a sync -------------------------------------------------------------------


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


def domain_events(changes: Iterable[Change], event_id: int, numbers: dict[int, int]) -> list[Any]:
    """Outbox events for the changes of one sync (types in docs/events.md)."""
    from processor.adapters.outbox import EventContext, build_event

    out: list[Any] = []
    for change in changes:
        entry = change.row.get("entry")
        context = EventContext(
            event=event_id,
            stage=change.row.get("stage"),
            entry=entry,
            entry_number=numbers.get(entry) if entry is not None else None,
        )
        out.extend(build_event(t, change.row, context) for t in _types_of(change))
    return out


async def record(conn: asyncpg.Connection, events: list[Any]) -> None:
    if events:
        from processor.adapters.outbox import record_events

        await record_events(conn, events)


# --- one event on one shard ----------------------------------------------------------------------


@dataclass(slots=True)
class ShardRun:
    """One live event's engine for the devices of one shard."""

    event_id: int
    shard: int
    course: Course
    engine: LiveEngine
    imeis: frozenset[str]
    entry_ids: dict[int, int] = field(default_factory=dict)  # number -> entry id

    @classmethod
    def build(cls, event_id: int, shard: int, shards: int, course: Course) -> ShardRun:
        imeis = frozenset(
            e.imei for e in course.entries if e.imei and shard_of(e.imei, shards) == shard
        )
        numbers = {e.number: int(e.id) for e in course.entries}
        return cls(event_id, shard, course, LiveEngine(course, source="live"), imeis, numbers)

    def all_units(self) -> set[tuple[Any, int]]:
        """Every (stage, entry number) of this shard's entries."""
        return {
            (s.id, e.number)
            for s in self.course.stages
            for e in self.course.entries
            if e.imei in self.imeis
        }


class DomainLive:
    """Owns some shards; runs their engines and keeps the result tables in step."""

    def __init__(self, runtime: Runtime) -> None:
        self.pool: asyncpg.Pool = runtime.pool
        self.redis: aioredis.Redis = runtime.redis
        self.settings = runtime.settings
        self.shards = runtime.settings.domain_shards
        self.views = LiveViews.for_runtime(runtime)
        self.leases = Leases(
            runtime.redis,
            f"{runtime.settings.stream}:domain",
            runtime.settings.consumer,
            self.shards,
            runtime.settings.domain_lease_ttl_ms,
        )
        self.courses: dict[int, Course] = {}
        self.tracked: frozenset[str] = frozenset()
        self.runs: dict[int, list[ShardRun]] = {}  # shard -> runs
        self.pending_phase: set[int] = set()
        self.fingerprint = ""
        self.leases_ready = asyncio.Event()

    # Storing side (every instance) ----------------------------------------------------------

    async def on_commit(self, records: list[Record]) -> None:
        """Post-commit hook: hand the new records to their shards' work streams."""
        by_shard: dict[int, list[Record]] = defaultdict(list)
        tracked = self.tracked
        for r in records:
            if r.imei in tracked:  # devices of no live event's entries have no domain work
                by_shard[shard_of(r.imei, self.shards)].append(r)
        if not by_shard:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard, items in by_shard.items():
                pipe.xadd(shard_stream(self.settings, shard), {"p": encode_positions(items)})
            await pipe.execute()

    # Owning side ---------------------------------------------------------------------------

    async def load_courses(self) -> None:
        async with self.pool.acquire() as conn:
            self.fingerprint = str(await conn.fetchval(COURSE_FINGERPRINT))
            events = await store.live_event_ids(conn)
            self.courses = {e: await store.load_course(conn, e) for e in events}
        self.tracked = frozenset(
            e.imei for course in self.courses.values() for e in course.entries if e.imei
        )
        for event_id, course in self.courses.items():
            with contextlib.suppress(Exception):
                await self.views.publish_course_of(event_id, course)
        log.info("live events loaded", events=sorted(self.courses))

    async def adopt(self, shard: int) -> None:
        """Take a shard: engines warmed from stored positions, tables synced, ranks fixed."""
        stream = shard_stream(self.settings, shard)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        runs = [ShardRun.build(e, shard, self.shards, c) for e, c in self.courses.items()]
        now = _now_ms()
        for run in runs:
            if not run.imeis:
                continue
            async with self.pool.acquire() as conn:
                positions = await store.load_positions(conn, run.course, imeis=run.imeis)
            run.engine.add(positions)
            run.engine.tick(now)
            await self.write(run, run.all_units())
        self.runs[shard] = runs
        self.pending_phase.add(shard)

    async def _adopt_or_release(self, shard: int) -> None:
        """Adopt a shard just acquired; on failure give it back so a later step retries."""
        try:
            await self.adopt(shard)
        except Exception:  # the lease goes back; this or another instance adopts it later
            log.exception("adopting a shard failed, releasing it", shard=shard)
            self.drop(shard)
            await self.leases.release(shard)

    def drop(self, shard: int) -> None:
        self.runs.pop(shard, None)
        self.pending_phase.discard(shard)

    async def process(self, shard: int, positions: list[Position]) -> None:
        for run in self.runs.get(shard, []):
            mine = [p for p in positions if p.imei in run.imeis]
            if not mine:
                continue
            affected = run.engine.add(mine)
            if affected:
                await self.write(run, affected)
            await self.views.publish_positions_of(run.event_id, run.course, mine)

    async def tick(self) -> None:
        now = _now_ms()
        for runs in list(self.runs.values()):
            for run in runs:
                affected = run.engine.tick(now)
                if affected:
                    await self.write(run, affected)

    async def write(self, run: ShardRun, affected: set[tuple[Any, int]]) -> None:
        """Sync the affected units of one shard run, fenced by its lease token."""
        try:
            await self._write(run, affected)
        except LeaseLostError:
            if not await self._recover_token(run.shard):
                raise
            await self._write(run, affected)

    async def _recover_token(self, shard: int) -> bool:
        """After a failed fence: if Redis still says we hold the lease, its tokens were
        lost (restart); move ours past the database's and go on. False: really lost."""
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT token FROM processor.domain_shards WHERE shard = $1", shard
            )
        token = await self.leases.raise_token(shard, int(stored or 0) + 1)
        if token is None:
            log.warning("shard lease lost", shard=shard)
            return False
        log.warning("shard token raised past the stored one", shard=shard, token=token)
        return True

    async def _write(self, run: ShardRun, affected: set[tuple[Any, int]]) -> None:
        token = self.leases.owned.get(run.shard)
        if token is None:
            raise LeaseLostError(f"shard {run.shard} is no longer owned")
        result = run.engine.result_for(affected)
        numbers = {v: k for k, v in run.entry_ids.items()}
        units = sorted((int(s), run.entry_ids[n]) for s, n in affected if n in run.entry_ids)
        stages = sorted({s for s, _ in units})
        async with self.pool.acquire() as conn, conn.transaction():
            await store.fence(conn, run.shard, token, self.leases.instance)
            # Stage locks first, in order: ranking reads every entry's row of a stage, so
            # taking them after writing rows would deadlock two shards' writers.
            for stage_id in stages:
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _RANK_LOCK, stage_id)
            changes: list[Change] = []
            for stage_id, entry_id in units:
                changes += await store.sync_entry_stage(
                    conn, result, stage_id, entry_id, ranked=False
                )
            for entry_id in sorted({e for _, e in units}):
                changes += await store.sync_entry_anomalies(conn, result, run.event_id, entry_id)
            for stage_id in stages:
                changes += await store.rank_stage_rows(conn, stage_id)
            await record(conn, domain_events(changes, run.event_id, numbers))
        for change in changes:
            ROWS_SYNCED.labels(change.table, change.action).inc()
        await self.views.publish_stages(self.pool, run.event_id, run.course, stages, changes)

    # Loops ------------------------------------------------------------------------------------

    async def run_leases(self, stop: asyncio.Event) -> None:
        """Background task: heartbeat and rebalance leases; adopt and drop shards."""
        interval = self.settings.domain_lease_ttl_ms / 3000
        while not stop.is_set():
            try:
                changes = await self.leases.step()
                LEASE_CHANGES.labels("acquired").inc(len(changes.acquired))
                LEASE_CHANGES.labels("lost").inc(len(changes.lost))
                for shard in changes.lost:
                    self.drop(shard)
                for shard in sorted(changes.acquired):
                    await self._adopt_or_release(shard)
                self.leases_ready.set()
                SHARDS_OWNED.set(len(self.runs))
            except Exception:  # the next step retries; leases not renewed just expire
                DOMAIN_ERRORS.labels("leases").inc()
                log.exception("lease step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
        for shard in list(self.runs):
            self.drop(shard)
        with contextlib.suppress(Exception):
            await self.leases.release_all()

    async def run_work(self, stop: asyncio.Event) -> None:
        """Background task: read the owned shards' work streams and process them."""
        while not stop.is_set():
            owned = sorted(self.runs)
            if not owned:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                continue
            try:
                await self._work_once(owned)
            except LeaseLostError as exc:
                DOMAIN_ERRORS.labels("lease_lost").inc()
                log.warning("shard lost while writing", error=str(exc))
            except Exception:  # work stays pending and is read again
                DOMAIN_ERRORS.labels("work").inc()
                log.exception("domain work failed")
                await asyncio.sleep(1)
                self.pending_phase.update(self.runs)

    async def _work_once(self, owned: list[int]) -> None:
        streams: dict[Any, Any] = {
            shard_stream(self.settings, s): "0" if s in self.pending_phase else ">" for s in owned
        }
        history = any(v == "0" for v in streams.values())
        block = None if history else int(self.settings.domain_batch_s * 1000)
        response: Any = await self.redis.xreadgroup(
            GROUP, CONSUMER, streams, count=2000, block=block
        )
        received: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for stream, items in response or ():
            shard = int(stream.decode().rsplit(":", 1)[1])
            received[shard].extend((raw_id, fields.get(b"p", b"[]")) for raw_id, fields in items)
        for shard in owned:
            # Only a read of the pending entries ("0") that found none ends the pending
            # phase: a shard re-adopted while a ">" read was blocking keeps its flag, or
            # the entries left pending by the lost lease would never be read again.
            if streams[shard_stream(self.settings, shard)] == "0" and not received.get(shard):
                self.pending_phase.discard(shard)
        for shard, items in received.items():
            if shard not in self.runs or not items:
                continue
            started = time.monotonic()
            positions = [p for _, data in items for p in decode_positions(data)]
            await self.process(shard, positions)
            WORK_SECONDS.observe(time.monotonic() - started)
            ids = [raw_id for raw_id, _ in items]
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(shard_stream(self.settings, shard), GROUP, *ids)
                pipe.xdel(shard_stream(self.settings, shard), *ids)
                await pipe.execute()

    async def run_ticks(self, stop: asyncio.Event) -> None:
        """Background task: tick every ``domain_tick_s`` (closures, ``offline``)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.domain_tick_s)
            if stop.is_set():
                return
            try:
                await self.tick()
                await self.views.flush()
                lengths = [await self.redis.xlen(shard_stream(self.settings, s)) for s in self.runs]
                WORK_LAG.set(sum(lengths))
            except Exception:  # retried at the next tick
                DOMAIN_ERRORS.labels("tick").inc()
                log.exception("domain tick failed")

    async def watch_courses(self, stop: asyncio.Event) -> None:
        """Background task: re-adopt the owned shards when a course changes in Directus."""
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
                    await self.load_courses()
                    for shard in sorted(self.runs):
                        await self.adopt(shard)
            except Exception:  # the next poll tries again
                log.exception("course reload failed")

    async def drain(self, timeout_s: float) -> None:
        """Burst mode: process the owned shards' work until their streams are empty."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.leases_ready.wait(), timeout=timeout_s)
        while time.monotonic() < deadline:
            lengths = [await self.redis.xlen(shard_stream(self.settings, s)) for s in self.runs]
            if not any(lengths):
                return
            await self._work_once(sorted(self.runs))


def _now_ms() -> int:
    return int(time.time() * 1000)


async def install(runtime: Runtime) -> None:
    """Wire the live domain into the service (unless ``PROCESSOR_DOMAIN_ENABLED=false``)."""
    if not runtime.settings.domain_enabled:
        return
    live = DomainLive(runtime)
    await live.load_courses()
    runtime.hooks.append(("domain", live.on_commit))
    runtime.background.extend([live.run_leases, live.run_work, live.run_ticks, live.watch_courses])
    runtime.drains.append(live.drain)
