"""Ranks, class ranks and gaps on a stage, and overall standings over special stages."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from processor.domain.model import Entry, Id
from processor.domain.rows import OverallStanding, StageResult

T = TypeVar("T")


def competition_ranks(items: Sequence[T], key: Callable[[T], object]) -> list[int]:
    """Ranks for items sorted by ``key``: equal keys share a rank, the next skips (1,2,2,4)."""
    ranks: list[int] = []
    for index, item in enumerate(items):
        if index and key(item) == key(items[index - 1]):
            ranks.append(ranks[-1])
        else:
            ranks.append(index + 1)
    return ranks


def rank_stage(results: Sequence[StageResult], entries: Mapping[Id, Entry]) -> list[StageResult]:
    """Fill rank, class_rank and gap_ms of finished entries (disqualified ones excepted)."""
    ranked = [
        r
        for r in results
        if r.status == "finished" and r.total_ms is not None and entries[r.entry_id].status != "dsq"
    ]
    ranked.sort(key=lambda r: (r.total_ms, r.entry_number))
    if not ranked:
        return list(results)
    leader = ranked[0].total_ms or 0
    fills: dict[Id, tuple[int, int, int]] = {}
    ranks = competition_ranks(ranked, lambda r: r.total_ms)
    class_ranks = _class_ranks(ranked, entries, lambda r: r.total_ms)
    for result, rank in zip(ranked, ranks, strict=True):
        total = result.total_ms or 0
        fills[result.entry_id] = (rank, class_ranks[result.entry_id], total - leader)
    out = []
    for result in results:
        fill = fills.get(result.entry_id)
        if fill is None:
            out.append(result)
        else:
            out.append(replace(result, rank=fill[0], class_rank=fill[1], gap_ms=fill[2]))
    return out


def _class_ranks(
    ranked: Sequence[StageResult], entries: Mapping[Id, Entry], key: Callable[[StageResult], object]
) -> dict[Id, int]:
    by_class: dict[str | None, list[StageResult]] = {}
    for result in ranked:
        by_class.setdefault(entries[result.entry_id].klass, []).append(result)
    out: dict[Id, int] = {}
    for members in by_class.values():
        for result, rank in zip(members, competition_ranks(members, key), strict=True):
            out[result.entry_id] = rank
    return out


def overall(
    results: Sequence[StageResult], entries: Sequence[Entry], special: set[Id]
) -> list[OverallStanding]:
    """Standings: more special stages finished first, then the lower sum of totals."""
    sums: dict[Id, list[int]] = {entry.id: [0, 0, 0] for entry in entries}
    for result in results:
        if result.stage_id in special and result.status == "finished":
            row = sums[result.entry_id]
            row[0] += 1
            row[1] += result.total_ms or 0
            row[2] += result.penalty_ms
    ranked = [e for e in entries if sums[e.id][0] > 0 and e.status != "dsq"]
    ranked.sort(key=lambda e: (-sums[e.id][0], sums[e.id][1], e.number))

    def key(entry: Entry) -> tuple[int, int]:
        return (sums[entry.id][0], sums[entry.id][1])

    ranks = dict(zip((e.id for e in ranked), competition_ranks(ranked, key), strict=True))
    class_ranks: dict[Id, int] = {}
    by_class: dict[str | None, list[Entry]] = {}
    for entry in ranked:
        by_class.setdefault(entry.klass, []).append(entry)
    for members in by_class.values():
        class_ranks.update(
            zip((e.id for e in members), competition_ranks(members, key), strict=True)
        )
    leader = sums[ranked[0].id] if ranked else None
    out = []
    for entry in sorted(entries, key=lambda e: e.number):
        count, total, penalty = sums[entry.id]
        gap = None
        if entry.id in ranks and leader is not None and count == leader[0]:
            gap = total - leader[1]
        out.append(
            OverallStanding(
                entry_id=entry.id,
                entry_number=entry.number,
                klass=entry.klass,
                stages_finished=count,
                total_ms=total,
                penalty_ms=penalty,
                rank=ranks.get(entry.id),
                class_rank=class_ranks.get(entry.id),
                gap_ms=gap,
            )
        )
    out.sort(key=lambda s: (s.rank is None, s.rank or 0, s.entry_number))
    return out
