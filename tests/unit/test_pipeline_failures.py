"""The pipeline's tasks when one of them fails for good: the failure comes out, nothing hangs.

Control flow only, so the source and sink are small in-memory stand-ins; storing and
acknowledging for real is covered by tests/integration and tests/faults.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import orjson
import pytest

from processor.core.deadletter import PHASE_NEW, DeadLetter, Delivery
from processor.core.pipeline import Pipeline, PipelineConfig
from processor.core.records import Record
from processor.core.state import DeviceStates

PAYLOAD = {
    "codec": 142,
    "ts": 1_780_000_000_000,
    "received_at": 1_780_000_000_250,
    "priority": 0,
    "lat": 45.8,
    "lon": 15.9,
    "alt": 120,
    "angle": 90,
    "sat": 11,
    "speed": 80,
    "event_io": 0,
    "io": {"239": 1},
}


class EndlessSource:
    """One new entry per read, for ever; settling or reading can be made to fail."""

    def __init__(self, *, settle_fails: bool = False, read_fails_after: int = 0) -> None:
        self.settle_fails = settle_fails
        self.read_fails_after = read_fails_after
        self.reads = itertools.count()

    async def read(self) -> Delivery:
        n = next(self.reads)
        if self.read_fails_after and n >= self.read_fails_after:
            raise ValueError("read refused")
        await asyncio.sleep(0)
        body = orjson.dumps(PAYLOAD | {"ts": PAYLOAD["ts"] + n})
        fields = {b"v": b"1", b"imei": b"356307040000001", b"payload": body}
        return Delivery([(f"{n + 1}-0", fields)], phase=PHASE_NEW)

    async def settle(self, ids: Sequence[str], dead: Sequence[DeadLetter]) -> None:
        if self.settle_fails:
            await asyncio.sleep(0.05)
            raise ValueError("settle refused")

    def restart_pending(self) -> None:
        pass


class SlowSink:
    def __init__(self) -> None:
        self.cancelled = 0

    async def write(self, records: Sequence[Record]) -> int:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return len(records)


def pipeline(source: EndlessSource, sink: SlowSink) -> Pipeline:
    config = PipelineConfig(batch_max_size=1, queue_max_batches=1, write_concurrency=2)
    return Pipeline(source, sink, config, states=DeviceStates(10), transient=lambda exc: False)


async def test_a_writer_failing_with_the_queue_full_ends_the_run_with_its_error() -> None:
    with pytest.raises(ValueError, match="settle refused"):
        await asyncio.wait_for(
            pipeline(EndlessSource(settle_fails=True), SlowSink()).run(asyncio.Event()), timeout=5
        )
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("pipeline-")]


async def test_a_reader_failing_stops_the_writer_and_ends_the_run_with_its_error() -> None:
    sink = SlowSink()
    with pytest.raises(ValueError, match="read refused"):
        await asyncio.wait_for(
            pipeline(EndlessSource(read_fails_after=3), sink).run(asyncio.Event()), timeout=5
        )
    assert sink.cancelled  # stores in flight were stopped, their entries left pending
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("pipeline-")]
