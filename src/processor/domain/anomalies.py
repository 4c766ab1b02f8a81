"""Safety alerts (DOMAIN.md "Anomalies") for one entry, from its records and stage runs.

State-like alerts are *episodes*: they start at the first record showing the condition and
end at the first record showing it over (``ended_at`` None while ongoing). Records that do
not carry the IO element keep the state, except for event-only signals (SOS, crash).
"""

from __future__ import annotations

import bisect
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
    """An entry's run on a stage: [start, end) (end None = open), its clean fixes (by ts)
    with their slow spans (index ranges), spikes and forbidden-zone passages."""

    start: int
    end: int | None
    special: bool
    running_now: bool
    fixes: Sequence[Position]
    slow: Sequence[Sequence[int]]
    spikes: Sequence[Position]
    forbidden: Sequence[tuple[Shape, Passage]]
    stage_name: str

    def covers(self, ts: int) -> bool:
        """Whether ``ts`` is while the entry runs this stage."""
        return ts >= self.start and (self.end is None or ts < self.end)


@dataclass(frozen=True, slots=True)
class Records:
    """An entry's records as detection reads them.

    ``all`` and ``plausible`` (clock plausible) are sorted by ts, ``fixes`` are the
    plausible ones with a fix, ``by_received`` is every record by reception time and
    ``gaps`` its consecutive pairs at least ``offline_after_s`` apart,
    ``nonfix`` the index spans of consecutive non-fixes in ``plausible`` and ``signals``
    the alert kinds some record showed (the others need no scan).
    """

    all: Sequence[Position]
    plausible: Sequence[Position]
    fixes: Sequence[Position]
    by_received: Sequence[Position]
    gaps: Sequence[tuple[Position, Position]]
    nonfix: Sequence[Sequence[int]]
    signals: frozenset[str]


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
    if records.signals:
        found += _signals(records.plausible, records.signals, rules)
    if len(records.plausible) != len(records.all):
        found += _clock(records.by_received)
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


def _signals(by_ts: Sequence[Position], signals: frozenset[str], rules: Rules) -> list[Found]:
    """SOS, crash and the IO alerts, each only if some record ever showed it."""
    found: list[Found] = []
    if "sos" in signals:
        for episode in episodes(by_ts, lambda r: r.priority == 2):
            found.append(("sos", "critical", episode, {}))
    if "crash" in signals:
        for episode in episodes(by_ts, _io_state(IO_CRASH, lambda v: v == 1, keep=False)):
            found.append(("crash", "critical", episode, {}))
    found += _io_signals(by_ts, signals, rules)
    return found


def _io_signals(by_ts: Sequence[Position], signals: frozenset[str], rules: Rules) -> list[Found]:
    """Alerts whose IO keeps its state when absent: only records carrying it matter."""
    found: list[Found] = []
    pct = rules.low_battery_pct
    if "low_battery" in signals:
        battery = [r for r in by_ts if IO_BATTERY in r.io]
        low = _io_state(IO_BATTERY, lambda v: v < pct, keep=True)
        for episode in episodes(battery, low):
            details = {"battery_pct": episode[2].io[IO_BATTERY]}
            found.append(("low_battery", "warning", episode, details))
    if "power_cut" in signals:
        cut = [r for r in by_ts if IO_POWER_CUT in r.io]
        for episode in episodes(cut, _io_state(IO_POWER_CUT, lambda v: v == 1, keep=True)):
            found.append(("power_cut", "warning", episode, {}))
    if "gnss_jamming" in signals:
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


def _clock(by_received: Sequence[Position]) -> list[Found]:
    """Implausible record times, in order of reception (their own times are unusable)."""
    found: list[Found] = []
    for episode in episodes(by_received, lambda r: not clock_ok(r), time=lambda r: r.received_at):
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
    found += _offline(records, runs, rules, now_ms)
    if records.nonfix:
        found += _no_fix(records.plausible, records.nonfix, runs)
    return found


def _ts(record: Position) -> int:
    return record.ts


def _nearest(fixes: Sequence[Position], ts: int) -> Position | None:
    """The first fix at or after ``ts``, else the last fix."""
    index = bisect.bisect_left(fixes, ts, key=_ts)
    if index < len(fixes):
        return fixes[index]
    return fixes[-1] if fixes else None


def _window(records: Sequence[Position], start: int, end: int | None) -> tuple[int, int]:
    """Index range [first, stop) of the records with start <= ts < end."""
    first = bisect.bisect_left(records, start, key=_ts)
    stop = len(records) if end is None else bisect.bisect_left(records, end, key=_ts)
    return first, stop


def _stopped(run: Run, rules: Rules) -> list[Found]:
    """Slow spans (speed < 5 km/h) inside the run lasting ``stopped_alert_s``."""
    found: list[Found] = []
    fixes = run.fixes
    first, stop = _window(fixes, run.start, run.end)
    limit = rules.stopped_alert_s * 1000
    for low, high in run.slow:
        a = max(low, first)
        b = min(high, stop - 1)
        if a > b or fixes[b].ts - fixes[a].ts < limit:
            continue
        ended = fixes[high + 1].ts if high + 1 < stop else None
        found.append(("stopped", "warning", (fixes[a].ts, ended, fixes[a]), {}))
    return found


def _offline(
    records: Records, runs: Sequence[Run], rules: Rules, now_ms: int | None
) -> list[Found]:
    """Gaps in reception while running; live, also the silence up to ``now``."""
    limit = rules.offline_after_s * 1000
    by_received = records.by_received
    found: list[Found] = []
    for a, b in records.gaps:
        if any(run.covers(a.ts) for run in runs):
            found.append(("offline", "warning", (a.received_at, b.received_at, a), {}))
    if by_received and now_ms is not None:
        last = by_received[-1]
        live = any(run.running_now and run.covers(last.ts) for run in runs)
        if live and now_ms - last.received_at >= limit:
            found.append(("offline", "warning", (last.received_at, None, last), {}))
    return found


def _no_fix(
    plausible: Sequence[Position], nonfix: Sequence[Sequence[int]], runs: Sequence[Run]
) -> list[Found]:
    """Only non-fixes for 60 s while running (the runs' union, in ts order)."""
    windows = _union((run.start, run.end) for run in runs)
    found: list[Found] = []
    for low, high in nonfix:
        pieces: list[list[int]] = []
        for start, end in windows:
            first, stop = _window(plausible, start, end)
            a, b = max(low, first), min(high, stop - 1)
            if a > b:
                continue
            if pieces and pieces[-1][1] == a - 1:
                pieces[-1][1] = b  # no record between: the same episode
            else:
                pieces.append([a, b])
        for a, b in pieces:
            if plausible[b].ts - plausible[a].ts >= NO_FIX_AFTER_MS:
                ended = plausible[b + 1].ts if b + 1 < len(plausible) else None
                found.append(("no_fix", "warning", (plausible[a].ts, ended, plausible[a]), {}))
    return found


def _union(windows: Iterable[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
    """Merge overlapping or touching [start, end) windows (end None = open)."""
    out: list[tuple[int, int | None]] = []
    for start, end in sorted(windows, key=lambda w: w[0]):
        if out and (out[-1][1] is None or start <= out[-1][1]):
            last_start, last_end = out[-1]
            merged = None if end is None or last_end is None else max(end, last_end)
            out[-1] = (last_start, merged)
        else:
            out.append((start, end))
    return out
