"""Batching by size or age. Pure: ``add`` returns a full batch or nothing.

The caller owns the clock (``now`` in seconds, monotonic) and does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from processor.core.deadletter import DeadLetter, Fields
from processor.core.records import Record


@dataclass(slots=True)
class Batch:
    """Records to store, dead letters to write, and every entry id to acknowledge after."""

    records: list[Record] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    sources: list[Fields] = field(default_factory=list)  # the entry fields of each record
    opened_at: float = 0.0

    def __len__(self) -> int:
        return len(self.ids)


class Batcher:
    """Accumulates decoded entries; a batch is due at ``max_size`` ids or ``max_age_s``."""

    def __init__(self, max_size: int, max_age_s: float) -> None:
        self.max_size = max_size
        self.max_age_s = max_age_s
        self._batch = Batch()

    def add(
        self,
        ids: list[str],
        records: list[Record],
        dead: list[DeadLetter],
        now: float,
        sources: list[Fields] | None = None,
    ) -> Batch | None:
        """Add one delivery's outcome; return the batch if it is now full."""
        if not ids:
            return None
        if not self._batch.ids:
            self._batch.opened_at = now
        self._batch.ids.extend(ids)
        self._batch.records.extend(records)
        self._batch.dead.extend(dead)
        if sources is not None:
            self._batch.sources.extend(sources)
        if len(self._batch.ids) >= self.max_size:
            return self.take()
        return None

    def due(self, now: float) -> Batch | None:
        """The open batch if it is older than ``max_age_s``, else None."""
        if self._batch.ids and now - self._batch.opened_at >= self.max_age_s:
            return self.take()
        return None

    def remaining_s(self, now: float) -> float | None:
        """Seconds until the open batch is due, or None when nothing is open."""
        if not self._batch.ids:
            return None
        return max(0.0, self.max_age_s - (now - self._batch.opened_at))

    def take(self) -> Batch | None:
        """Hand over the open batch (if any) and start a new one."""
        if not self._batch.ids:
            return None
        batch, self._batch = self._batch, Batch()
        return batch
