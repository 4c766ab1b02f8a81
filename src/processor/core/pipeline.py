"""The throughput pipeline: read → decode → batch → store → post-commit work → acknowledge.

Two tasks joined by a bounded queue: the reader decodes and batches the next entries while
the writer stores the previous batches, and when the writer falls behind the full queue
stops the reader (backpressure instead of memory growth, rule 8). The writer keeps up to
``write_concurrency`` batches in the database at once (one transaction each), so the
database inserts one batch while this process prepares the next; post-commit work and
acknowledgement still run batch after batch, in reading order. An entry is acknowledged
only after everything it produced is committed (rule 4); transient failures are retried
with backoff without acknowledging, and nothing stops the loop (rule 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from processor.core import metrics
from processor.core.batcher import Batch, Batcher
from processor.core.contract import decode_entry, decode_run
from processor.core.deadletter import PHASE_NEW, DeadLetter, Delivery, Fields
from processor.core.records import Record, Rejection
from processor.core.retry import Backoff, retrying
from processor.core.state import DeviceStates
from processor.logs import get_logger

log = get_logger("pipeline")

T = TypeVar("T")

STORAGE_REJECTED = "storage_rejected"


class Source(Protocol):
    """Where entries come from (a consumer group on the record stream)."""

    async def read(self) -> Delivery: ...

    async def settle(self, ids: Sequence[str], dead: Sequence[DeadLetter]) -> None: ...

    def restart_pending(self) -> None: ...


class Sink(Protocol):
    """Where records go; returns how many were new (not stored before)."""

    async def write(self, records: Sequence[Record]) -> int: ...


# Post-commit work (the domain, ...): called with every record stored by the batch.
CommitHook = Callable[[list[Record]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """The knobs the pipeline needs, taken from the settings."""

    batch_max_size: int = 5_000
    batch_max_age_s: float = 0.2
    queue_max_batches: int = 2
    write_concurrency: int = 2
    max_entry_bytes: int = 65_536
    max_io_elements: int = 512
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0


@dataclass(slots=True)
class PipelineStats:
    """Running totals, for tools and tests (metrics carry the same numbers)."""

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    first_read: float = field(default=0.0)
    last_commit: float = field(default=0.0)


class Pipeline:
    """Moves entries from a :class:`Source` to a :class:`Sink` until stopped or drained."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        config: PipelineConfig,
        *,
        states: DeviceStates,
        transient: Callable[[BaseException], bool],
        hooks: Sequence[tuple[str, CommitHook]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.sink = sink
        self.config = config
        self.states = states
        self.transient = transient
        self.hooks = list(hooks)
        self.clock = clock
        self.stats = PipelineStats()
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue(config.queue_max_batches)
        self._stopping = False  # after a failure: no task waits for the other any more

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Run until ``stop`` is set (or, in burst mode, the stream is drained); then flush."""
        writer = asyncio.create_task(self._write_loop(), name="pipeline-writer")
        reader = asyncio.create_task(self._read_loop(stop, burst), name="pipeline-reader")
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
        # A failure stops the other task too; what was read and not stored stays pending.
        for failed, other in ((writer, reader), (reader, writer)):
            if failed in done and failed.exception() is not None:
                self._stopping = True
                other.cancel()
                await asyncio.gather(other, return_exceptions=True)
                raise failed.exception()  # type: ignore[misc]
        await reader
        await writer

    # Reading -----------------------------------------------------------------------------

    async def _read_loop(self, stop: asyncio.Event, burst: bool) -> None:
        batcher = Batcher(self.config.batch_max_size, self.config.batch_max_age_s)
        ahead: asyncio.Task[Delivery | None] | None = None
        try:
            while not stop.is_set():
                delivery = await (ahead or self._read(stop))
                ahead = None
                if delivery is None:
                    break
                now = self.clock()
                if delivery.empty():
                    await self._put(batcher.take())
                    if burst and delivery.phase == PHASE_NEW:
                        break
                    continue
                # Read ahead: Redis prepares and sends the next entries while these are
                # decoded (after an empty read there is no hurry, and burst mode ends).
                ahead = asyncio.create_task(self._read(stop), name="pipeline-read-ahead")
                await asyncio.sleep(0)  # let it send the request before decoding starts
                await self._put(self._add(batcher, delivery, now))
                await self._put(batcher.due(now))
            if ahead is not None:  # stopping: what it read is stored and acknowledged too
                delivery, ahead = await ahead, None
                if delivery is not None and not delivery.empty():
                    await self._put(self._add(batcher, delivery, self.clock()))
            await self._put(batcher.take())
        finally:
            if ahead is not None:  # only on failure: entries it read stay pending
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)
            if self._stopping:  # the writer failed: nobody will make room in the queue
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(None)
            else:
                await self._queue.put(None)

    async def _read(self, stop: asyncio.Event) -> Delivery | None:
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        while not stop.is_set():
            try:
                delivery = await self.source.read()
            except Exception as exc:
                if not self.transient(exc):
                    raise
                self._note_retry("redis", exc, backoff)
                self.source.restart_pending()
                await _sleep_or_stop(stop, backoff.next_delay())
                continue
            metrics.UP.labels("redis").set(1)
            return delivery
        return None

    def _add(self, batcher: Batcher, delivery: Delivery, now: float) -> Batch | None:
        if not self.stats.first_read:
            self.stats.first_read = now
        records, dead, sources = self._decode(delivery.entries)
        dead.extend(delivery.exhausted)
        self.stats.read += len(delivery.entries)
        metrics.ENTRIES_READ.labels(delivery.phase).inc(len(delivery.entries))
        return batcher.add(delivery.all_ids(), records, dead, now, sources)

    def _decode(
        self, entries: list[tuple[str, Fields]]
    ) -> tuple[list[Record], list[DeadLetter], list[Fields]]:
        limit, io_limit = self.config.max_entry_bytes, self.config.max_io_elements
        run = _decode_run(entries, limit, io_limit)
        if run is not None:  # every entry valid: decoded at once
            return run, [], [fields for _, fields in entries]
        records: list[Record] = []
        sources: list[Fields] = []
        dead: list[DeadLetter] = []
        for sid, fields in entries:
            outcome = decode_entry(sid, fields, max_entry_bytes=limit, max_io_elements=io_limit)
            if type(outcome) is Rejection:
                dead.append(DeadLetter.from_rejection(sid, outcome, fields))
            else:
                records.append(outcome)  # type: ignore[arg-type]
                sources.append(fields)
        return records, dead, sources

    async def _put(self, batch: Batch | None) -> None:
        if batch is not None:
            await self._queue.put(batch)
            metrics.QUEUE_BATCHES.set(self._queue.qsize())

    # Writing -----------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Start storing each batch as it comes (up to ``write_concurrency`` at once) and
        finish them in reading order as soon as each is stored."""
        writing: deque[tuple[Batch, asyncio.Task[int], float]] = deque()
        taking: asyncio.Task[Batch | None] | None = None
        more = True
        try:
            while more or writing:
                if more and taking is None and len(writing) < self.config.write_concurrency:
                    taking = asyncio.create_task(self._queue.get())
                waiting: list[asyncio.Future[Any]] = [] if taking is None else [taking]
                if writing:
                    waiting.append(writing[0][1])
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if taking is not None and taking.done():
                    batch, taking = taking.result(), None
                    metrics.QUEUE_BATCHES.set(self._queue.qsize())
                    if batch is None:
                        more = False
                    else:
                        store = asyncio.create_task(self._store(batch), name="pipeline-store")
                        writing.append((batch, store, self.clock()))
                while writing and writing[0][1].done():
                    await self._commit(*writing.popleft())
        finally:  # only on failure: what was being written stays pending, read again later
            if taking is not None:
                taking.cancel()
            for _, store, _ in writing:
                store.cancel()
            await asyncio.gather(*(store for _, store, _ in writing), return_exceptions=True)

    async def _commit(self, batch: Batch, store: asyncio.Task[int], started: float) -> None:
        """After ``batch`` is stored: post-commit work, then acknowledgement, in batch order."""
        new = await store
        # Hooks see every stored record of the batch, not only those new to the table: an
        # entry redelivered after a crash between commit and hook must reach them again
        # (they are idempotent, like the domain engine).
        stored = _stored(batch)
        for name, hook in self.hooks:
            await self._run_hook(name, hook, stored)
        await self._with_retry("redis", lambda: self.source.settle(batch.ids, batch.dead))
        self._account(batch, new, stored, self.clock() - started)

    async def _store(self, batch: Batch) -> int:
        try:
            return await self._with_retry("postgres", lambda: self.sink.write(batch.records))
        except Exception as exc:
            if self.transient(exc) or len(batch.records) == 0:
                raise
            log.error("batch rejected by storage, isolating", error=repr(exc))
            return await self._store_one_by_one(batch)

    async def _store_one_by_one(self, batch: Batch) -> int:
        """A batch the database refuses: store what it accepts, dead-letter the rest."""
        new = 0
        for record, fields in zip(batch.records, batch.sources, strict=True):
            try:
                new += await self._with_retry("postgres", _writer_of(self.sink, record))
            except Exception as exc:
                if self.transient(exc):
                    raise
                detail = f"database refused the record: {type(exc).__name__}: {exc}"[:500]
                batch.dead.append(DeadLetter(record.stream_id, STORAGE_REJECTED, detail, fields))
        return new

    async def _run_hook(self, name: str, hook: CommitHook, new: list[Record]) -> None:
        try:
            await self._with_retry(name, lambda: hook(new))
        except Exception:
            # Derived work is recomputable from stored positions (replay), so a bug there
            # must not stop the positions path; it is counted and logged loudly.
            metrics.HOOK_ERRORS.labels(name).inc()
            log.exception("post-commit work failed", hook=name, records=len(new))

    async def _with_retry(self, dependency: str, action: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        result = await retrying(
            action,
            transient=self.transient,
            backoff=backoff,
            on_retry=lambda exc, delay: self._note_retry(dependency, exc, backoff, delay),
        )
        metrics.UP.labels(dependency).set(1)
        return result

    def _note_retry(
        self, dependency: str, exc: BaseException, backoff: Backoff, delay: float | None = None
    ) -> None:
        metrics.RETRIES.labels(dependency).inc()
        metrics.UP.labels(dependency).set(0)
        log.warning(
            "dependency unavailable, retrying",
            dependency=dependency,
            error=f"{type(exc).__name__}: {exc}",
            attempt=backoff.attempt,
            delay_s=round(delay, 3) if delay is not None else None,
        )

    def _account(self, batch: Batch, new: int, stored: list[Record], seconds: float) -> None:
        self.states.observe(stored)  # idempotent: newest times, last fix
        self.stats.batches += 1
        self.stats.stored += new
        self.stats.duplicates += len(stored) - new
        self.stats.dead_lettered += len(batch.dead)
        self.stats.last_commit = self.clock()
        metrics.RECORDS_WRITTEN.inc(new)
        metrics.DUPLICATES.inc(len(stored) - new)
        for letter in batch.dead:
            metrics.DEAD_LETTERS.labels(letter.reason).inc()
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_SECONDS.observe(seconds)
        metrics.STATE_SIZE.set(len(self.states))
        metrics.STATE_EVICTIONS.set(self.states.evictions)
        _observe_lag(batch.records)


def _decode_run(
    entries: list[tuple[str, Fields]], limit: int, io_limit: int
) -> list[Record] | None:
    """The records of entries that all have exactly the contract's fields and all pass
    (:func:`processor.core.contract.decode_run`: what ``decode_entry`` gives each, with
    the checks made once over the run); None when any might not, to decode one by one."""
    try:
        if not entries or any(len(fields) != 3 for _, fields in entries):
            return None
        return decode_run(
            [sid for sid, _ in entries],
            [fields[b"v"] for _, fields in entries],
            [fields[b"imei"] for _, fields in entries],
            [fields[b"payload"] for _, fields in entries],
            max_entry_bytes=limit,
            max_io_elements=io_limit,
        )
    except (KeyError, TypeError):  # other field names (str keys, say): one by one
        return None


def _stored(batch: Batch) -> list[Record]:
    """The batch's records minus those the database refused (dead-lettered)."""
    if not batch.dead:
        return batch.records
    refused = {letter.source_id for letter in batch.dead}
    return [r for r in batch.records if r.stream_id not in refused]


def _writer_of(sink: Sink, record: Record) -> Callable[[], Awaitable[int]]:
    return lambda: sink.write([record])


def _observe_lag(records: list[Record]) -> None:
    if not records:
        return
    now_ms = time.time() * 1000
    step = max(1, len(records) // 100)
    for record in records[::step]:
        metrics.LAG_SECONDS.observe(max(0.0, now_ms - record.received_at) / 1000)
    metrics.LAST_LAG.set(max(0.0, now_ms - records[-1].received_at) / 1000)


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)
