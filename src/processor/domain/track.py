"""An entry's records kept ready for evaluation, extended in time order at low cost.

Live data mostly arrives in order: each new record then costs O(1) here (the spike test,
one new segment scanned against the grid, a few running aggregates). Anything older than
what is already held makes the caller start a fresh :class:`EntryTrack` and extend it with
every record: the same code path, so the result never depends on how records arrived.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from processor.domain.anomalies import (
    IO_BATTERY,
    IO_CRASH,
    IO_JAMMING,
    IO_POWER_CUT,
    STOPPED_BELOW_KMH,
    Records,
)
from processor.domain.compiled import StagePlan
from processor.domain.fixes import clock_ok, has_fix, spike
from processor.domain.model import Position, Rules
from processor.domain.stage import (
    Crossing,
    Memo,
    Scan,
    StageOutcome,
    cell_key,
    scan_lone_fix,
    scan_segment,
)

T = TypeVar("T")
_LOCAL_REORDER: Final = 64  # records received out of order by at most this many: insert
_SIGNAL_IOS: Final = frozenset({IO_CRASH, IO_BATTERY, IO_POWER_CUT, IO_JAMMING})


@dataclass(slots=True)
class StageTrack:
    """One stage's window of an entry's fixes: spikes judged, segments scanned.

    Fix *i* can be judged a spike only once fix *i+1* is known, so the newest fix is held
    as *tentative*: it joins the kept fixes (and its segment the scan) only in :meth:`view`.
    """

    plan: StagePlan
    max_speed_kmh: float
    lo: float
    hi: float
    raw: list[Position] = field(default_factory=list)
    kept: list[Position] = field(default_factory=list)
    spikes: list[Position] = field(default_factory=list)
    cells: list[tuple[int, int]] = field(default_factory=list)
    crossings: dict[int, list[Crossing]] = field(default_factory=dict)
    others: dict[int, list[int]] = field(default_factory=dict)
    slow: list[list[int]] = field(default_factory=list)
    memo: Memo = field(default_factory=Memo)
    updated_at: int | None = None
    cached: tuple[tuple[object, ...], StageOutcome] | None = None

    @classmethod
    def open(cls, plan: StagePlan, rules: Rules) -> StageTrack:
        """An empty track for a stage."""
        stage = plan.stage
        lo = -math.inf if stage.opens_at is None else stage.opens_at
        hi = math.inf if stage.closes_at is None else stage.closes_at
        return cls(plan, rules.max_speed_kmh, lo, hi)

    def add_fix(self, fix: Position) -> None:
        """Append a fix (newer than all held); judge the one before it."""
        raw = self.raw
        raw.append(fix)
        if len(raw) >= 2:
            self._judge(raw[-2], fix)

    def _judge(self, fix: Position, after: Position) -> None:
        kept = self.kept
        if kept and spike(kept[-1], fix, after, self.max_speed_kmh):
            self.spikes.append(fix)
            return
        kept.append(fix)
        self.cells.append(cell_key(fix))
        index = len(kept) - 1
        if index:
            pair = (self.cells[index - 1], self.cells[index])
            scan_segment(self.plan, kept[index - 1], fix, pair, index - 1,
                         (self.crossings, self.others))  # fmt: skip
        if fix.speed < STOPPED_BELOW_KMH:
            _extend_span(self.slow, index)

    def view(self) -> tuple[list[Position], Scan, list[list[int]]]:
        """The clean fixes with the tentative newest one appended (undo with :meth:`close`),
        their scan and their slow runs (index spans)."""
        if not self.raw:
            return self.kept, (self.crossings, self.others), self.slow
        tentative = self.raw[-1]
        kept = self.kept
        kept.append(tentative)
        index = len(kept) - 1
        scanned: Scan = (self.crossings, self.others)
        if index:
            extra: Scan = ({}, {})
            pair = (self.cells[index - 1], cell_key(tentative))
            scan_segment(self.plan, kept[index - 1], tentative, pair, index - 1, extra)
            scanned = (_merged(self.crossings, extra[0]), _merged(self.others, extra[1]))
        else:
            scanned = ({}, {})
            scan_lone_fix(self.plan, tentative, scanned)
        slow = self.slow
        if tentative.speed < STOPPED_BELOW_KMH:
            slow = slow[:]  # the spans are shared: copy the one extended
            if slow and slow[-1][1] == index - 1:
                slow[-1] = [slow[-1][0], index]
            else:
                slow.append([index, index])
        return kept, scanned, slow

    def close(self) -> None:
        """Undo :meth:`view`: take the tentative fix back out of the kept ones."""
        if self.raw:
            self.kept.pop()


def _merged(base: dict[int, list[T]], extra: dict[int, list[T]]) -> dict[int, list[T]]:
    """``base`` with ``extra`` appended, sharing nothing that is changed."""
    if not extra:
        return base
    out = dict(base)
    for key, values in extra.items():
        out[key] = [*base.get(key, ()), *values]
    return out


def _extend_span(spans: list[list[int]], index: int) -> None:
    if spans and spans[-1][1] == index - 1:
        spans[-1][1] = index
    else:
        spans.append([index, index])


@dataclass(slots=True)
class EntryTrack:
    """All of one entry's records (in stage windows) and what evaluation needs from them."""

    rules: Rules
    stages: list[StageTrack]
    last_ts: float = -math.inf
    all: list[Position] = field(default_factory=list)
    plausible: list[Position] = field(default_factory=list)
    fixes: list[Position] = field(default_factory=list)
    by_received: list[Position] = field(default_factory=list)
    received_sorted: bool = True
    gaps: dict[tuple[int, int], tuple[Position, Position]] = field(default_factory=dict)
    nonfix: list[list[int]] = field(default_factory=list)
    signals: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, plans: Sequence[StagePlan], rules: Rules) -> EntryTrack:
        """An empty track for an entry on these stages."""
        return cls(rules, [StageTrack.open(plan, rules) for plan in plans])

    def extend(self, records: Sequence[Position]) -> None:
        """Append records sorted by ts, all newer than :attr:`last_ts`."""
        for record in records:
            self._add(record)

    def _add(self, record: Position) -> None:
        self.last_ts = record.ts
        self.all.append(record)
        self._receive(record)
        if not clock_ok(record):
            return
        self.plausible.append(record)
        self._signal(record)
        fix = has_fix(record)
        if fix:
            self.fixes.append(record)
        else:
            _extend_span(self.nonfix, len(self.plausible) - 1)
        ts = record.ts
        received_at = record.received_at
        for stage in self.stages:
            if stage.lo <= ts <= stage.hi:
                if stage.updated_at is None or received_at > stage.updated_at:
                    stage.updated_at = received_at
                if fix:
                    stage.add_fix(record)

    def _receive(self, record: Position) -> None:
        """Keep records by reception, and the reception gaps long enough for ``offline``
        (keyed by the record before the gap). A record received slightly out of order is
        inserted in place; a bigger disorder is sorted once when :meth:`records` is read."""
        received = self.by_received
        if not self.received_sorted:
            received.append(record)
            return
        key = (record.received_at, record.ts)
        at = len(received)
        if received and key < _reception(received[-1]):
            at = bisect.bisect_left(received, key, key=_reception)
            if len(received) - at > _LOCAL_REORDER:
                self.received_sorted = False
                received.append(record)
                return
        before = received[at - 1] if at else None
        after = received[at] if at < len(received) else None
        received.insert(at, record)
        if before is not None:
            self.gaps.pop(_reception(before), None)
            self._gap(before, record)
        if after is not None:
            self._gap(record, after)

    def _gap(self, a: Position, b: Position) -> None:
        if b.received_at - a.received_at >= self.rules.offline_after_s * 1000:
            self.gaps[_reception(a)] = (a, b)

    def _signal(self, record: Position) -> None:
        if record.priority == 2:
            self.signals.add("sos")
        io = record.io
        if not io or _SIGNAL_IOS.isdisjoint(io):
            return
        if io.get(IO_CRASH) == 1:
            self.signals.add("crash")
        battery = io.get(IO_BATTERY)
        if isinstance(battery, int) and battery < self.rules.low_battery_pct:
            self.signals.add("low_battery")
        if io.get(IO_POWER_CUT) == 1:
            self.signals.add("power_cut")
        if io.get(IO_JAMMING) in (1, 2):
            self.signals.add("gnss_jamming")

    def records(self) -> Records:
        """The lists anomaly detection reads."""
        if not self.received_sorted:
            received = self.by_received
            received.sort(key=_reception)
            self.gaps = {}
            for a, b in itertools.pairwise(received):
                self._gap(a, b)
            self.received_sorted = True
        return Records(
            all=self.all,
            plausible=self.plausible,
            fixes=self.fixes,
            by_received=self.by_received,
            gaps=[self.gaps[key] for key in sorted(self.gaps)],
            nonfix=self.nonfix,
            signals=frozenset(self.signals),
        )


def _reception(record: Position) -> tuple[int, int]:
    return (record.received_at, record.ts)


__all__ = ["EntryTrack", "StageTrack"]
