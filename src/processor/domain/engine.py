"""The race engine: positions and a course in, timing, penalties, results, alerts out.

:func:`evaluate` is the batch form (offline replay); :class:`LiveEngine` the incremental
one (the service). Both keep, per entry, its records inside the stage windows, deduplicated
by ``ts``, and evaluate an entry from that set alone, so feeding any batches in any order
gives exactly :func:`evaluate` over their union. Neither reads a clock: ``now`` is data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from processor.domain.anomalies import Run, detect
from processor.domain.compiled import CourseIndex
from processor.domain.fixes import MAX_CLOCK_AHEAD_MS, MIN_PLAUSIBLE_TS
from processor.domain.model import Course, Entry, Id, Position
from processor.domain.ranking import overall, rank_stage
from processor.domain.rows import (
    Anomaly,
    DomainResult,
    OverallStanding,
    Penalty,
    StageResult,
    TimingRecord,
)
from processor.domain.stage import StageOutcome, evaluate_stage
from processor.domain.track import EntryTrack

__all__ = [
    "Anomaly",
    "DomainResult",
    "LiveEngine",
    "OverallStanding",
    "Penalty",
    "StageResult",
    "TimingRecord",
    "evaluate",
]

Affected = set[tuple[Id, int]]


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """Everything one entry produced: per stage, and its anomalies."""

    stages: Mapping[Id, StageOutcome]
    anomalies: tuple[Anomaly, ...]


@dataclass(slots=True)
class EntryState:
    """One entry's records by ``ts`` (one canonical record per ts) and its ready track."""

    entry: Entry
    records: dict[int, Position] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    rebuild: bool = False
    track: EntryTrack | None = None

    def put(self, position: Position) -> bool:
        """Keep a record unless a canonical duplicate is already held; whether it changed."""
        records = self.records
        ts = position.ts
        current = records.get(ts)
        if current is not None and _canonical(current) <= _canonical(position):
            return False
        records[ts] = position
        if current is not None and ts not in self.pending:
            self.rebuild = True  # a held record changed: start again
        self.pending.add(ts)
        return True

    def ready(self, index: CourseIndex) -> EntryTrack:
        """The track with every record in: extended when the new ones are all newer than
        what it holds, else rebuilt from all records."""
        track = self.track
        if track is None or self.rebuild or (self.pending and min(self.pending) <= track.last_ts):
            track = self.track = EntryTrack.open(index.plans, index.course.rules)
            new = sorted(self.records)
        else:
            new = sorted(self.pending)
        records = self.records
        track.extend([records[ts] for ts in new])
        self.pending = set()
        self.rebuild = False
        return track


@dataclass(slots=True)
class _Store:
    """Every entry's state; routes positions to the entries that own them."""

    index: CourseIndex
    states: dict[Id, EntryState]

    @classmethod
    def open(cls, index: CourseIndex) -> _Store:
        """Empty states for every entry of the course."""
        return cls(index, {entry.id: EntryState(entry) for entry in index.course.entries})

    def add(self, positions: Iterable[Position]) -> set[Id]:
        """Store positions; the ids of entries whose record set changed."""
        by_imei = self.index.by_imei
        in_scope = self.index.in_scope
        states = self.states
        changed: set[Id] = set()
        for position in positions:
            entries = by_imei.get(position.imei)
            if not entries:
                continue
            ts = position.ts
            plausible = MIN_PLAUSIBLE_TS <= ts <= position.received_at + MAX_CLOCK_AHEAD_MS
            when = ts if plausible else position.received_at
            if not in_scope(when):
                continue
            for entry in entries:
                if entry.owns(when) and states[entry.id].put(position):
                    changed.add(entry.id)
        return changed


def _canonical(position: Position) -> tuple[object, ...]:
    """A total order on records sharing (imei, ts), so duplicates resolve the same way in
    any delivery order: the earliest received wins, then the smallest content."""
    io = tuple(
        sorted(
            (k, (0, v, b"") if isinstance(v, int) else (1, 0, v)) for k, v in position.io.items()
        )
    )
    return (
        position.received_at,
        position.lat,
        position.lon,
        position.alt,
        position.angle,
        position.sat,
        position.speed,
        position.priority,
        position.event_io,
        io,
    )


def evaluate_entry(
    index: CourseIndex, state: EntryState, now_ms: int | None, source: str
) -> EntryOutcome:
    """Evaluate one entry on every stage and detect its anomalies."""
    track = state.ready(index)
    entry = state.entry
    rules = index.course.rules
    event_id = index.course.event.id
    stages: dict[Id, StageOutcome] = {}
    runs: list[Run] = []
    views = []
    try:
        for plan, stage_track in zip(index.plans, track.stages, strict=True):
            stage = plan.stage
            clean, scanned, slow = stage_track.view()
            views.append(stage_track)
            closed = stage.closed_at(now_ms)
            # Same fixes, same data time, same closure: the same outcome (live, most
            # stages of an entry do not change between two batches).
            key = (len(stage_track.raw), stage_track.updated_at, closed, source)
            if stage_track.cached is not None and stage_track.cached[0] == key:
                outcome = stage_track.cached[1]
            else:
                outcome = evaluate_stage(
                    plan,
                    entry,
                    rules,
                    clean,
                    scanned,
                    closed=closed,
                    updated_at=stage_track.updated_at,
                    source=source,
                    event_id=event_id,
                    memo=stage_track.memo,
                )
                stage_track.cached = (key, outcome)
            stages[stage.id] = outcome
            if outcome.running is not None:
                start, end = outcome.running
                running_now = outcome.result.status == "running"
                runs.append(
                    Run(start, end, stage.kind == "special", running_now, clean, slow,
                        stage_track.spikes, outcome.forbidden, stage.name)
                )  # fmt: skip
        anomalies = detect(entry, track.records(), runs, rules, now_ms, event_id)
    finally:
        for stage_track in views:
            stage_track.close()
    return EntryOutcome(stages, tuple(anomalies))


def assemble(
    index: CourseIndex,
    outcomes: Mapping[Id, EntryOutcome],
    only: set[tuple[Id, int]] | None = None,
) -> DomainResult:
    """Rank every stage, compute overall standings and sort all rows; with ``only``, keep
    just the rows of those (stage id, entry number) pairs and the anomalies of their
    entries (ranks and standings still consider everyone)."""
    course = index.course
    entries = {entry.id: entry for entry in course.entries}
    order = {plan.stage.id: position for position, plan in enumerate(index.plans)}
    records: list[TimingRecord] = []
    penalties: list[Penalty] = []
    results: list[StageResult] = []
    all_results: list[StageResult] = []
    anomalies: list[Anomaly] = []
    for plan in index.plans:
        stage_results = []
        for entry in course.entries:
            outcome = outcomes[entry.id].stages[plan.stage.id]
            if only is None or (plan.stage.id, entry.number) in only:
                records += outcome.records
                penalties += outcome.penalties
            stage_results.append(outcome.result)
        ranked = rank_stage(stage_results, entries)
        results += (
            ranked if only is None else [r for r in ranked if (r.stage_id, r.entry_number) in only]
        )
        all_results += ranked
    numbers = None if only is None else {number for _, number in only}
    for entry in course.entries:
        if numbers is None or entry.number in numbers:
            anomalies += outcomes[entry.id].anomalies
    special = {p.stage.id for p in index.plans if p.stage.kind == "special"}
    return DomainResult(
        timing_records=tuple(
            sorted(
                records,
                key=lambda r: (
                    order[r.stage_id],
                    r.entry_number,
                    r.ts,
                    r.geofence_name,
                    r.kind,
                    r.pass_,
                ),
            )
        ),
        penalties=tuple(
            sorted(
                penalties,
                key=lambda p: (
                    order[p.stage_id],
                    p.entry_number,
                    p.reason,
                    p.geofence_name or "",
                    p.seq,
                ),
            )
        ),
        stage_results=tuple(sorted(results, key=lambda r: (order[r.stage_id], r.entry_number))),
        anomalies=tuple(
            sorted(anomalies, key=lambda a: (a.entry_number, a.started_at, a.kind, a.device_imei))
        ),
        overall=tuple(overall(all_results, course.entries, special)),
    )


def evaluate(
    course: Course,
    positions: Iterable[Position],
    now_ms: int | None = None,
    *,
    source: str = "replay",
) -> DomainResult:
    """Evaluate a course over positions in one pass (order and duplicates do not matter).

    ``now_ms`` is the evaluation time: stages whose ``closes_at`` has passed are closed
    and silent running devices are ``offline``; None evaluates from the data alone.
    """
    index = CourseIndex.build(course)
    store = _Store.open(index)
    store.add(positions)
    outcomes = {
        entry_id: evaluate_entry(index, state, now_ms, source)
        for entry_id, state in store.states.items()
    }
    return assemble(index, outcomes)


class LiveEngine:
    """Incremental evaluation: add positions as they commit, tick with the clock.

    After any sequence of :meth:`add` and a final :meth:`tick` with ``now``, :meth:`result`
    equals ``evaluate(course, union_of_positions, now)``. An entry is re-evaluated from its
    stored records whenever its record set changes (late data included); memory per entry
    is its records inside the stage windows.
    """

    def __init__(self, course: Course, *, source: str = "live") -> None:
        self._index = CourseIndex.build(course)
        self._store = _Store.open(self._index)
        self._source = source
        self._now: int | None = None
        self._entries = {entry.id: entry for entry in course.entries}
        self._outcomes = {
            entry_id: evaluate_entry(self._index, state, None, source)
            for entry_id, state in self._store.states.items()
        }
        self._ranked = self._rank_all()

    @property
    def now_ms(self) -> int | None:
        """The time of the last tick."""
        return self._now

    def add(self, positions: Iterable[Position]) -> Affected:
        """Take positions (any order, duplicates allowed); the (stage id, entry number)
        pairs whose timing records, penalties, result or anomalies changed."""
        return self._refresh(self._store.add(positions))

    def tick(self, now_ms: int) -> Affected:
        """Advance the clock: stage closures and live ``offline`` alerts; what changed."""
        before = self._now
        self._now = now_ms
        closing = any(
            plan.stage.closed_at(before) != plan.stage.closed_at(now_ms)
            for plan in self._index.plans
        )
        if closing:
            return self._refresh(set(self._entries))
        running = {
            entry_id
            for entry_id, outcome in self._outcomes.items()
            if any(s.result.status == "running" for s in outcome.stages.values())
        }
        return self._refresh(running)

    def result(self) -> DomainResult:
        """Every row as of now (same shape and order as :func:`evaluate`)."""
        return assemble(self._index, self._outcomes)

    def result_for(self, affected: Iterable[tuple[Id, int]]) -> DomainResult:
        """The current rows of some (stage id, entry number) pairs, e.g. what :meth:`add`
        or :meth:`tick` reported, with their entries' anomalies and full standings."""
        return assemble(self._index, self._outcomes, set(affected))

    def _refresh(self, entry_ids: set[Id]) -> Affected:
        affected: Affected = set()
        for entry_id in sorted(entry_ids, key=lambda e: self._entries[e].number):
            entry = self._entries[entry_id]
            old = self._outcomes[entry_id]
            new = evaluate_entry(self._index, self._store.states[entry_id], self._now, self._source)
            self._outcomes[entry_id] = new
            affected |= _changes(entry, old, new, self._index)
        if affected:
            ranked = self._rank_all()
            for key, result in ranked.items():
                if self._ranked.get(key) != result:
                    affected.add(key)
            self._ranked = ranked
        return affected

    def _rank_all(self) -> dict[tuple[Id, int], StageResult]:
        out: dict[tuple[Id, int], StageResult] = {}
        for plan in self._index.plans:
            results = [self._outcomes[e].stages[plan.stage.id].result for e in self._entries]
            for result in rank_stage(results, self._entries):
                out[(result.stage_id, result.entry_number)] = result
        return out


def _changes(entry: Entry, old: EntryOutcome, new: EntryOutcome, index: CourseIndex) -> Affected:
    """Entry-stage pairs whose rows differ; a changed anomaly marks the stages around it."""
    affected: Affected = set()
    for stage_id, outcome in new.stages.items():
        if old.stages.get(stage_id) != outcome:
            affected.add((stage_id, entry.number))
    before = {(a.kind, a.started_at): a for a in old.anomalies}
    after = {(a.kind, a.started_at): a for a in new.anomalies}
    for key in before.keys() | after.keys():
        if before.get(key) == after.get(key):
            continue
        stages = [p.stage.id for p in index.plans if p.stage.contains(key[1])]
        if not stages and index.plans:
            stages = [index.plans[0].stage.id]
        affected.update((stage_id, entry.number) for stage_id in stages)
    return affected
