"""Safety alerts (DOMAIN.md "Anomalies") for one entry, from its records and stage runs.

State-like alerts are *episodes*: they start at the first record showing the condition and
end at the first record showing it over (``ended_at`` None while ongoing). Records that do
not carry the IO element keep the state, except for event-only signals (SOS, crash).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from processor.domain.compiled import Shape
from processor.domain.fixes import clock_ok
from processor.domain.model import Entry, Position, Rules
from processor.domain.rows import Anomaly
from processor.domain.stage import Passage

STOPPED_BELOW_KMH: Final = 5
NO_FIX_AFTER_MS: Final = 60_000
IO_CRASH: Final = 247
IO_BATTERY: Final = 113
IO_POWER_CUT: Final = 252
IO_JAMMING: Final = 318

Episode = tuple[int, int | None, Position]
Found = tuple[str, str, Episode, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Run:
    """An entry's run on a stage: [start, end) (end None = open), its fixes, its state."""

    start: int
    end: int | None
    special: bool
    running_now: bool
    fixes: Sequence[Position]
    spikes: Sequence[Position]
    forbidden: Sequence[tuple[Shape, Passage]]
    stage_name: str

    def covers(self, ts: int) -> bool:
        """Whether ``ts`` is while the entry runs this stage."""
        return ts >= self.start and (self.end is None or ts < self.end)


@dataclass(frozen=True, slots=True)
class Records:
    """An entry's records three ways: all (by ts), plausible-clock ones, and fixes."""

    all: Sequence[Position]
    plausible: Sequence[Position]
    fixes: Sequence[Position]


def detect(
    entry: Entry,
    records: Records,
    runs: Sequence[Run],
    rules: Rules,
    now_ms: int | None,
    event_id: Any,
) -> list[Anomaly]:
    """Every anomaly of the entry, one per (device, kind, started_at), sorted by start."""
    found: list[Found] = []
    found += _signals(records.plausible, rules)
    if len(records.plausible) != len(records.all):
        found += _clock(records.all)
    if runs:
        found += _running(records, runs, rules, now_ms)
    out: dict[tuple[str, int], Anomaly] = {}
    for kind, severity, (start, end, record), details in found:
        key = (kind, start)
        if key in out:
            continue
        out[key] = Anomaly(
            event_id=event_id,
            entry_id=entry.id,
            entry_number=entry.number,
            device_imei=record.imei,
            kind=kind,
            severity=severity,
            started_at=start,
            ended_at=end,
            details={"lat": record.lat, "lon": record.lon, **details},
        )
    return sorted(out.values(), key=lambda a: (a.started_at, a.kind))


def episodes(
    records: Iterable[Position],
    state: Callable[[Position], bool | None],
    time: Callable[[Position], int] = lambda r: r.ts,
) -> list[Episode]:
    """Spans where ``state`` is true; a record where it is None keeps the state."""
    return [(start, end, first) for start, end, first, _ in spans(records, state, time)]


def spans(
    records: Iterable[Position],
    state: Callable[[Position], bool | None],
    time: Callable[[Position], int] = lambda r: r.ts,
) -> list[tuple[int, int | None, Position, int]]:
    """:func:`episodes` with the time of the last record showing the condition."""
    out: list[tuple[int, int | None, Position, int]] = []
    opened: Position | None = None
    last_on = 0
    for record in records:
        on = state(record)
        if on is None:
            continue
        if on:
            if opened is None:
                opened = record
            last_on = time(record)
        elif opened is not None:
            out.append((time(opened), time(record), opened, last_on))
            opened = None
    if opened is not None:
        out.append((time(opened), None, opened, last_on))
    return out


def _io_state(
    io_id: int, test: Callable[[int], bool], keep: bool
) -> Callable[[Position], bool | None]:
    def state(record: Position) -> bool | None:
        value = record.io.get(io_id)
        if not isinstance(value, int):
            return None if keep else False
        return test(value)

    return state


def _signals(by_ts: Sequence[Position], rules: Rules) -> list[Found]:
    """SOS, crash and the IO alerts; each first checks cheaply whether it ever shows."""
    found: list[Found] = []
    if any(r.priority == 2 for r in by_ts):
        for episode in episodes(by_ts, lambda r: r.priority == 2):
            found.append(("sos", "critical", episode, {}))
    if any(r.io.get(IO_CRASH) == 1 for r in by_ts if r.io):
        for episode in episodes(by_ts, _io_state(IO_CRASH, lambda v: v == 1, keep=False)):
            found.append(("crash", "critical", episode, {}))
    found += _io_signals(by_ts, rules)
    return found


def _io_signals(by_ts: Sequence[Position], rules: Rules) -> list[Found]:
    """Alerts whose IO keeps its state when absent: only records carrying it matter."""
    found: list[Found] = []
    pct = rules.low_battery_pct
    battery = [r for r in by_ts if IO_BATTERY in r.io]
    if any(isinstance(v := r.io[IO_BATTERY], int) and v < pct for r in battery):
        low = _io_state(IO_BATTERY, lambda v: v < pct, keep=True)
        for episode in episodes(battery, low):
            details = {"battery_pct": episode[2].io[IO_BATTERY]}
            found.append(("low_battery", "warning", episode, details))
    power = [r for r in by_ts if r.io.get(IO_POWER_CUT) == 1]
    if power:
        cut = [r for r in by_ts if IO_POWER_CUT in r.io]
        for episode in episodes(cut, _io_state(IO_POWER_CUT, lambda v: v == 1, keep=True)):
            found.append(("power_cut", "warning", episode, {}))
    jamming = [r for r in by_ts if r.io.get(IO_JAMMING) in (1, 2)]
    if jamming:
        jam = [r for r in by_ts if IO_JAMMING in r.io]
        for episode in episodes(jam, _io_state(IO_JAMMING, lambda v: v in (1, 2), keep=True)):
            found.append(("gnss_jamming", _jamming_severity(jam, episode), episode, {}))
    return found


def _jamming_severity(by_ts: Sequence[Position], episode: Episode) -> str:
    start, end, _ = episode
    for record in by_ts:
        during = record.ts >= start and (end is None or record.ts < end)
        if during and record.io.get(IO_JAMMING) == 2:
            return "critical"
    return "warning"


def _clock(records: Sequence[Position]) -> list[Found]:
    """Implausible record times, in order of reception (their own times are unusable)."""
    ordered = sorted(records, key=lambda r: (r.received_at, r.ts))
    found: list[Found] = []
    for episode in episodes(ordered, lambda r: not clock_ok(r), time=lambda r: r.received_at):
        found.append(("clock", "warning", episode, {"record_ts_ms": episode[2].ts}))
    return found


def _running(
    records: Records,
    runs: Sequence[Run],
    rules: Rules,
    now_ms: int | None,
) -> list[Found]:
    found: list[Found] = []
    for run in runs:
        if run.special:
            found += _stopped(run, rules)
        for spike in run.spikes:
            found.append(("gps_jump", "info", (spike.ts, spike.ts, spike), {}))
        for shape, passage in run.forbidden:
            end = passage.exit.ts if passage.exit is not None else None
            record = _nearest(run.fixes, passage.enter.ts)
            if record is not None:
                details = {"geofence": shape.geofence.name, "stage": run.stage_name}
                found.append(
                    ("forbidden_zone", "warning", (passage.enter.ts, end, record), details)
                )
    found += _offline(records.all, runs, rules, now_ms)
    if len(records.fixes) != len(records.plausible):
        found += _no_fix(records.plausible, records.fixes, runs)
    return found


def _nearest(fixes: Sequence[Position], ts: int) -> Position | None:
    after = [f for f in fixes if f.ts >= ts]
    return after[0] if after else (fixes[-1] if fixes else None)


def _stopped(run: Run, rules: Rules) -> list[Found]:
    fixes = [f for f in run.fixes if run.covers(f.ts)]
    found: list[Found] = []
    if not any(f.speed < STOPPED_BELOW_KMH for f in fixes):
        return found
    for start, end, record, last in spans(fixes, lambda f: f.speed < STOPPED_BELOW_KMH):
        if last - start >= rules.stopped_alert_s * 1000:
            found.append(("stopped", "warning", (start, end, record), {}))
    return found


def _offline(
    records: Sequence[Position], runs: Sequence[Run], rules: Rules, now_ms: int | None
) -> list[Found]:
    """Gaps in reception while running; live, also the silence up to ``now``."""
    limit = rules.offline_after_s * 1000
    ordered = sorted(records, key=lambda r: (r.received_at, r.ts))
    found: list[Found] = []
    for a, b in itertools.pairwise(ordered):
        if b.received_at - a.received_at >= limit and any(run.covers(a.ts) for run in runs):
            found.append(("offline", "warning", (a.received_at, b.received_at, a), {}))
    if ordered and now_ms is not None:
        last = ordered[-1]
        live = any(run.running_now and run.covers(last.ts) for run in runs)
        if live and now_ms - last.received_at >= limit:
            found.append(("offline", "warning", (last.received_at, None, last), {}))
    return found


def _no_fix(
    by_ts: Sequence[Position], fixes: Sequence[Position], runs: Sequence[Run]
) -> list[Found]:
    """Only non-fixes for 60 s while running."""
    fix_ids = {id(f) for f in fixes}

    def state(record: Position) -> bool:
        return id(record) not in fix_ids and any(run.covers(record.ts) for run in runs)

    found: list[Found] = []
    for start, end, record, last in spans(by_ts, state):
        if last - start >= NO_FIX_AFTER_MS:
            found.append(("no_fix", "warning", (start, end, record), {}))
    return found
