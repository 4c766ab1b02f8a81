"""Per-device state: a bounded LRU of what the pipeline and the domain know per device."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from processor.core.records import Record


@dataclass(slots=True)
class DeviceState:
    """What is remembered about one device between batches."""

    last_ts: int = 0  # newest record time seen (ms)
    last_received_at: int = 0  # newest ingestion time seen (ms)
    last_fix_ts: int = 0
    last_lat: float = 0.0
    last_lon: float = 0.0
    records: int = 0
    extra: Any = None  # owned by whoever attaches state to the device (e.g. the domain)


class DeviceStates:
    """An LRU of :class:`DeviceState` with a fixed capacity (ARCHITECTURE.md rule 8)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.evictions = 0
        self._states: OrderedDict[int, DeviceState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._states

    def get(self, device_id: int) -> DeviceState:
        """The device's state, created if new; marks it most recently used."""
        state = self._states.get(device_id)
        if state is None:
            state = DeviceState()
            self._states[device_id] = state
            if len(self._states) > self.capacity:
                self._states.popitem(last=False)
                self.evictions += 1
        else:
            self._states.move_to_end(device_id)
        return state

    def peek(self, device_id: int) -> DeviceState | None:
        """The device's state without touching recency, or None."""
        return self._states.get(device_id)

    def observe(self, records: list[Record]) -> None:
        """Fold committed records into their devices' state (a redelivered record counts
        again in ``records``; the times and the last fix are unaffected)."""
        states = self._states
        for record in records:
            state = states.get(record.device_id)
            if state is None:
                state = self.get(record.device_id)
            else:
                states.move_to_end(record.device_id)
            state.records += 1
            ts = record.ts
            if ts > state.last_ts:  # noqa: PLR1730 - cheaper than max() on the hot path
                state.last_ts = ts
            if record.received_at > state.last_received_at:  # noqa: PLR1730 - hot path
                state.last_received_at = record.received_at
            if record.sat > 0 and ts >= state.last_fix_ts:
                state.last_fix_ts = ts
                state.last_lat = record.lat
                state.last_lon = record.lon
