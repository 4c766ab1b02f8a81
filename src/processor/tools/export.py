"""The analytics export: a second consumer group on the record stream, written to Parquet.

The exporter reads through its own consumer group (``settings.export_group``, default
``analytics``) with the same :class:`StreamSource` and the same contract decoder as the
processor, so the processor is untouched. Entries delivered since the last
acknowledgement form one *batch*; a batch is flushed when it holds ``export_max_rows``
rows or is ``export_max_age_s`` old: its rows are written per UTC day as
``date=YYYY-MM-DD/part-<first id>.parquet`` (temporary name, fsync, rename, directory
fsync) and only then are its entries acknowledged, in the same MULTI/EXEC as its dead
letters. Exactly-once output rests on four rules (argued in docs/export.md):

1. a batch is acknowledged as a whole, so the consumer's pending list is always whole
   batches, and at most one batch is written-but-unacknowledged (flushes are sequential);
2. on start the first batch is exactly the own pending entries (all of them, nothing
   else), so a re-delivered batch has the crashed one's first id and rows;
3. a batch's files replace every earlier file of the same name (and same-named files in
   days it no longer covers are removed);
4. on start, any other file named after a still-pending entry (a batch written but never
   acknowledged, e.g. by a consumer of another name) is deleted: its entries are pending
   and will be exported again.

Writing runs in a worker thread while the next batch is read and decoded (decoding itself
optionally in worker processes, see :mod:`processor.tools.export_decode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyarrow as pa
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError, ResponseError

from processor.adapters.redis_stream import DeadLetter, Delivery, StreamSource, entry_id
from processor.core.retry import Backoff
from processor.logs import get_logger
from processor.settings import Settings
from processor.tools.export_decode import ChunkDecoder, Decoded, Entries, StreamSpec
from processor.tools.export_files import (
    BatchFiles,
    Dataset,
    DatasetError,
    DiskFullError,
    WrittenBatch,
    data_files,
    first_id_of,
)
from processor.tools.export_schema import SCHEMA, split_by_day

_PHASE_PENDING: Final = "pending"  # Delivery.phase of this consumer's own pending entries
_PHASE_CLAIM: Final = "claim"
_PHASE_NEW: Final = "new"
DISK_RETRY_INITIAL_S: Final = 0.5  # a full disk is freed by an operator: seconds, not ms
DISK_RETRY_MAX_S: Final = 10.0
# A batch is written ahead while it is still being read, in row groups of a fifth of
# ``export_max_rows``, so that little is left to write when it is flushed.
WRITE_AHEAD_PARTS: Final = 5

ROWS = Counter("processor_export_rows_total", "Rows written to Parquet and acknowledged")
REJECTED = Counter(
    "processor_export_rejected_total",
    "Entries the export sent to the dead-letter stream",
    ["reason"],
)
FILES = Counter("processor_export_files_total", "Parquet files renamed into place")
WRITE_ERRORS = Counter(
    "processor_export_write_errors_total",
    "Batch writes that failed and are retried (the entries stay unacknowledged)",
    ["reason"],
)
FLUSH_SECONDS = Histogram(
    "processor_export_flush_seconds",
    "Time to write, sync, rename and acknowledge one batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def _log() -> structlog.typing.FilteringBoundLogger:
    # Resolved at use, not import: a logger bound before configure_logging ignores its level.
    return get_logger("export")


class ExportError(Exception):
    """The export cannot go on: the stream is unreachable or the dataset not writable."""


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """When a batch is flushed, and how entries are decoded."""

    max_rows: int
    max_age_s: float
    max_entry_bytes: int = 65_536
    max_io_elements: int = 512
    read_count: int = 10_000  # new entries per read by the decoder (XREADGROUP COUNT)
    read_block_ms: int = 500  # how long such a read waits for new entries (not in burst)

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportLimits:
        return cls(
            max_rows=settings.export_max_rows,
            max_age_s=settings.export_max_age_s,
            max_entry_bytes=settings.max_entry_bytes,
            max_io_elements=settings.max_io_elements,
            read_count=settings.export_read_count,
            read_block_ms=settings.read_block_ms,
        )


@dataclass(slots=True)
class ExportStats:
    """What one run did; times are ``time.perf_counter()`` values (0.0 when not reached)."""

    rows: int = 0
    rejected: int = 0
    files: int = 0
    batches: int = 0
    rewritten: int = 0  # files of unacknowledged earlier deliveries replaced or removed
    first_read_at: float = 0.0
    last_rename_at: float = 0.0


@dataclass(slots=True)
class Batch:
    """Entries delivered since the last acknowledgement: Arrow chunks, ids, dead letters."""

    started: float | None = None  # monotonic time of the first delivery taken in
    chunks: list[pa.RecordBatch] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    rows: int = 0
    first_id: str | None = None
    # Rows written ahead into the batch's files while it is read (see Exporter._write_ahead):
    files: BatchFiles | None = None
    appends: list[asyncio.Future[None]] = field(default_factory=list)
    unwritten: list[pa.RecordBatch] = field(default_factory=list)  # chunks not yet written
    unwritten_rows: int = 0

    def add(self, delivery: Delivery, entries: Entries, decoded: Decoded) -> None:
        """Take in a delivery whose ``entries`` were decoded; rejections become dead letters."""
        if self.started is None and not delivery.empty():
            self.started = time.monotonic()
        if decoded.rejections:
            fields = dict(entries)
            self.dead.extend(
                DeadLetter.from_rejection(sid, rejection, fields[sid])
                for sid, rejection in decoded.rejections
            )
        self.dead.extend(delivery.exhausted)
        self.ids.extend(sid for sid, _ in entries)
        self.ids.extend(letter.source_id for letter in delivery.exhausted)
        self.ids.extend(delivery.vanished)
        self._add_chunk(decoded)
        # Each list of a delivery is in stream order, so its head is its lowest id.
        if delivery.entries:
            self._track_first(delivery.entries[0][0])
        if delivery.exhausted:
            self._track_first(delivery.exhausted[0].source_id)
        if delivery.vanished:
            self._track_first(delivery.vanished[0])

    def add_read(self, decoded: Decoded) -> None:
        """Take in entries the decoder read itself (new entries): ids, rows, rejections."""
        ids = decoded.id_list()
        if not ids:
            return
        if self.started is None:
            self.started = time.monotonic()
        self.dead.extend(
            DeadLetter.from_rejection(sid, rejection, fields)
            for (sid, rejection), fields in zip(decoded.rejections, decoded.rejected, strict=True)
        )
        self.ids.extend(ids)
        self._add_chunk(decoded)
        self._track_first(ids[0])  # read in stream order: the first is the lowest

    def _add_chunk(self, decoded: Decoded) -> None:
        if decoded.chunk is not None:
            self.chunks.append(decoded.chunk)
            self.rows += decoded.rows
            self.unwritten.append(decoded.chunk)
            self.unwritten_rows += decoded.rows

    def _track_first(self, head: str) -> None:
        if self.first_id is None or id_key(head) < id_key(self.first_id):
            self.first_id = head

    def empty(self) -> bool:
        """True when nothing was delivered into this batch."""
        return not self.ids

    def due(self, limits: ExportLimits, now: float) -> bool:
        """True when the batch is full or old enough to be flushed."""
        return self.rows >= limits.max_rows or (
            self.started is not None and now - self.started >= limits.max_age_s
        )

    def table(self) -> pa.Table:
        """The batch's rows as one table of ``SCHEMA``."""
        return pa.Table.from_batches(self.chunks, schema=SCHEMA)


def id_key(stream_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id ``<ms>-<seq>``."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class _Decoding:
    """A delivery handed to the decoder, or (``delivery`` None) a read by the decoder."""

    delivery: Delivery | None
    entries: Entries
    result: asyncio.Future[Decoded]


class Exporter:
    """The read → decode → write → acknowledge loop of one export consumer."""

    def __init__(
        self,
        source: StreamSource,
        dataset: Dataset,
        limits: ExportLimits,
        *,
        burst: bool,
        decoder: ChunkDecoder | None = None,
        claim_every_s: float = 30.0,
    ) -> None:
        self._source = source
        self._dataset = dataset
        self._limits = limits
        self._burst = burst
        self._decoder = decoder or ChunkDecoder(
            workers=0,
            max_entry_bytes=limits.max_entry_bytes,
            max_io_elements=limits.max_io_elements,
        )
        # Deliveries decoding in workers at once: enough to keep every worker busy.
        self._max_decoding = 2 * self._decoder.workers
        # While the decoder reads new entries itself, the source is read (idle entries
        # claimed, see StreamSource.read) this often; reads in flight at once:
        self._claim_every_s = claim_every_s
        self._max_reading = max(2, 2 * self._decoder.workers)
        self._drained = False  # burst: a read by the decoder found no new entry
        self._group_lost = False  # a read by the decoder found no group (Redis restarted)
        self._decoding: deque[_Decoding] = deque()
        self._recovering = True  # own pending entries are re-read first, as one batch
        self._batch = Batch()
        self._flushing: Batch | None = None
        self._stop = asyncio.Event()
        self._inflight: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None  # writes ahead, then commits, in order
        self.stats = ExportStats()

    def stop(self) -> None:
        """Stop reading; the current batch is flushed and acknowledged before run returns."""
        self._stop.set()

    async def run(self) -> ExportStats:
        """Export until stopped (or, in burst mode, until the stream is drained).

        The source is read first (own pending entries, then idle ones claimed); once it
        delivers new entries, the decoder reads new entries itself, handing back to the
        source every ``claim_every_s`` (with no read of the decoder in flight).
        """
        reading: asyncio.Task[Delivery] | None = self._read_next()
        try:
            while reading is not None:
                delivery = await reading
                if not self.stats.first_read_at:
                    self.stats.first_read_at = time.perf_counter()
                drained = self._burst and delivery.empty() and delivery.phase != _PHASE_PENDING
                handover = self._decoder.reads and delivery.phase == _PHASE_NEW and not drained
                # Read ahead: Redis serves the next delivery while this one is decoded.
                reading = None if drained or handover or self._stop.is_set() else self._read_next()
                self._decode(delivery)
                while len(self._decoding) > self._max_decoding:
                    await self._take_oldest()
                if handover:
                    await self._read_in_decoder()
                    if not (self._drained or self._stop.is_set()):
                        reading = self._read_next()
            while self._decoding:
                await self._take_oldest()
            if not self._batch.empty():
                await self._start_flush()
        finally:
            if reading is not None:
                reading.cancel()  # entries it had read stay pending and are read again
            while self._decoding:
                self._decoder.discard(self._decoding.popleft().result)
            await self._wait_inflight()
            await self._discard_written_ahead(self._batch)  # never committed: not acked
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        return self.stats

    def _read_next(self) -> asyncio.Task[Delivery]:
        return asyncio.create_task(self._source.read())

    async def _read_in_decoder(self) -> None:
        """Let the decoder read new entries until stopped, drained or a claim is due.

        Returns with every read taken in, so no entry of ours is in flight when the
        source claims idle entries next.
        """
        limits = self._limits
        block_ms = 1 if self._burst else limits.read_block_ms
        count = min(limits.read_count, limits.max_rows)
        until = time.monotonic() + self._claim_every_s
        self._group_lost = False
        while not (self._drained or self._group_lost or self._stop.is_set()):
            if time.monotonic() >= until:
                break
            result = self._decoder.read_new(count, block_ms)
            self._decoding.append(_Decoding(None, (), result))
            while len(self._decoding) >= self._max_reading:
                await self._take_oldest()
        while self._decoding:
            await self._take_oldest()

    def _decode(self, delivery: Delivery) -> None:
        entries: Entries = delivery.entries
        if delivery.phase == _PHASE_CLAIM:  # never take one of our own entries twice
            known = self._unacknowledged_ids()
            entries = [(sid, fields) for sid, fields in entries if sid not in known]
        self._decoding.append(_Decoding(delivery, entries, self._decoder.submit(entries)))

    def _unacknowledged_ids(self) -> set[str]:
        # Reads by the decoder are all taken in before the source reads (and claims).
        known = set(self._batch.ids)
        known.update(sid for item in self._decoding for sid, _ in item.entries)
        if self._flushing is not None:
            known.update(self._flushing.ids)
        return known

    async def _take_oldest(self) -> None:
        """Add the oldest decoded delivery to the batch; flush when the batch is due."""
        item = self._decoding.popleft()
        try:
            decoded = await item.result
        except BrokenProcessPool as exc:
            raise ExportError("a decode worker process died") from exc
        except ResponseError as exc:
            if item.delivery is not None or not str(exc).startswith("NOGROUP"):
                raise
            # The source creates the group again and starts over with own pending entries.
            _log().warning("consumer group gone, reading through the source", error=str(exc))
            self._group_lost = True
            return
        phase = _PHASE_NEW if item.delivery is None else item.delivery.phase
        if self._recovering and phase != _PHASE_PENDING:
            self._recovering = False
            if not self._batch.empty():  # the redone batch: exactly the own pending entries
                await self._start_flush()
        if item.delivery is None:
            self._drained = self._drained or (self._burst and not decoded.ids)
            self._batch.add_read(decoded)
        else:
            self._batch.add(item.delivery, item.entries, decoded)
        if not self._recovering and self._batch.due(self._limits, time.monotonic()):
            await self._start_flush()
        else:
            self._write_ahead(self._batch, max(1, self._limits.max_rows // WRITE_AHEAD_PARTS))

    def _write_ahead(self, batch: Batch, rows: int) -> None:
        """Write the batch's unwritten chunks as a row group of its files once they hold
        ``rows`` rows, in the writer thread, while the batch goes on being read.

        Only :meth:`Dataset.commit_batch` at the flush names the files after the batch's
        first id and renames them into place: until then they are temporary files that a
        restart deletes, so writing ahead changes nothing of what is committed when.
        """
        if not batch.unwritten or batch.unwritten_rows < rows:
            return
        if batch.files is None:
            batch.files = self._dataset.batch_files()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="export-write")
        files, chunks = batch.files, batch.unwritten
        batch.unwritten, batch.unwritten_rows = [], 0

        def append() -> None:
            files.append(split_by_day(pa.Table.from_batches(chunks, schema=SCHEMA)))

        batch.appends.append(asyncio.get_running_loop().run_in_executor(self._writer, append))

    async def _commit_written_ahead(self, batch: Batch) -> WrittenBatch | None:
        """Put the files written ahead in place; None when the batch has none, or when
        writing them failed (they are then deleted and the batch is written whole)."""
        if batch.files is None or self._writer is None:
            return None
        assert batch.first_id is not None  # a batch with rows has one
        self._write_ahead(batch, 0)  # the rest of its rows
        loop = asyncio.get_running_loop()
        try:
            for append in batch.appends:
                await append
            return await loop.run_in_executor(
                self._writer, self._dataset.commit_batch, batch.first_id, batch.files
            )
        except DatasetError as exc:
            _log().warning("writing ahead failed, writing the batch whole", error=str(exc))
            await self._discard_written_ahead(batch)
            return None

    async def _discard_written_ahead(self, batch: Batch) -> None:
        files, batch.files = batch.files, None
        if files is None or self._writer is None:
            return
        await asyncio.gather(*batch.appends, return_exceptions=True)
        batch.appends.clear()
        await asyncio.get_running_loop().run_in_executor(self._writer, files.discard)

    async def _start_flush(self) -> None:
        """Hand the batch to the writer (after the previous flush is done); start a new one."""
        await self._wait_inflight()
        self._flushing, self._batch = self._batch, Batch()
        self._inflight = asyncio.create_task(self._flush(self._flushing))

    async def _wait_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            await task
        self._flushing = None

    async def _flush(self, batch: Batch) -> None:
        """Write the batch's files durably, then dead-letter and acknowledge its entries."""
        assert batch.first_id is not None  # a non-empty batch always has one
        started = time.perf_counter()
        written = await self._commit_written_ahead(batch)
        if written is None:
            written = await self._write_retrying(batch.first_id, batch.table())
        self.stats.last_rename_at = time.perf_counter()
        await self._source.settle(batch.ids, batch.dead)
        self._account(batch, len(written.paths))
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        self.stats.rewritten += written.replaced + written.removed
        if written.replaced or written.removed:
            _log().info(
                "rewrote the files of an unacknowledged delivery",
                first_id=batch.first_id,
                replaced=written.replaced,
                removed=written.removed,
            )

    async def _write_retrying(self, first_id: str, table: pa.Table) -> WrittenBatch:
        """Write the batch; while the disk is full, wait and try again (nothing is acked).

        A stop request while the disk is still full ends the export with an error; the
        batch's entries stay pending and are exported by the next run.
        """
        backoff = Backoff(DISK_RETRY_INITIAL_S, DISK_RETRY_MAX_S)
        while True:
            try:
                return await asyncio.to_thread(self._write, first_id, table)
            except DiskFullError as exc:
                WRITE_ERRORS.labels("disk_full").inc()
                if self._stop.is_set():
                    raise ExportError(f"stopped while the disk is full: {exc}") from exc
                delay = backoff.next_delay()
                _log().warning("dataset disk full, retrying", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)

    def _write(self, first_id: str, table: pa.Table) -> WrittenBatch:
        return self._dataset.write_batch(first_id, split_by_day(table))

    def _account(self, batch: Batch, files: int) -> None:
        ROWS.inc(batch.rows)
        FILES.inc(files)
        for letter in batch.dead:
            REJECTED.labels(letter.reason).inc()
        self.stats.rows += batch.rows
        self.stats.rejected += len(batch.dead)
        self.stats.files += files
        self.stats.batches += 1


def claim_idle_ms(settings: Settings) -> int:
    """How long an entry must be idle before XAUTOCLAIM takes it.

    Entries wait in our own batch up to ``export_max_age_s`` before they are written and
    acknowledged; they must never look idle to our own XAUTOCLAIM meanwhile.
    """
    return max(settings.claim_idle_ms, int(settings.export_max_age_s * 2_000) + 10_000)


def consumer_for(settings: Settings, dataset: Dataset, explicit: str | None) -> str:
    """The consumer name: ``--consumer``, else ``PROCESSOR_CONSUMER`` if set, else the
    name kept in the dataset directory (stable across restarts)."""
    if explicit:
        return explicit
    if "consumer" in settings.model_fields_set:
        return settings.consumer
    return dataset.consumer_name()


async def run_export(
    settings: Settings,
    out: Path,
    *,
    burst: bool = False,
    consumer: str | None = None,
    handle_signals: bool = True,
) -> ExportStats:
    """Run the exporter into ``out`` until SIGTERM/SIGINT (or the stream is drained)."""
    client = aioredis.Redis.from_url(settings.redis_dsn())
    try:
        with Dataset(out) as dataset:
            name = consumer_for(settings, dataset, consumer)
            source = StreamSource(
                client,
                stream=settings.stream,
                group=settings.export_group,
                consumer=name,
                dead_letter_stream=settings.dead_letter_stream,
                max_deliveries=settings.max_deliveries,
                claim_idle_ms=claim_idle_ms(settings),
                count=settings.read_count,
                block_ms=1 if burst else settings.read_block_ms,
            )
            limits = ExportLimits.from_settings(settings)
            await source.ensure_group()
            await discard_uncommitted(client, source, dataset)
            _log().info("export started", stream=settings.stream, consumer=name, out=str(out))
            spec = StreamSpec(settings.redis_dsn(), source.stream, source.group, name)
            with contextlib.closing(_decoder(settings, spec)) as decoder:
                await decoder.start()
                exporter = Exporter(
                    source,
                    dataset,
                    limits,
                    burst=burst,
                    decoder=decoder,
                    claim_every_s=claim_idle_ms(settings) / 2000,
                )
                with _signals(exporter) if handle_signals else contextlib.nullcontext():
                    stats = await exporter.run()
            _log().info(
                "export stopped", rows=stats.rows, rejected=stats.rejected, files=stats.files
            )
            return stats
    except RedisError as exc:
        raise ExportError(f"stream {settings.stream!r}: {exc}") from exc
    finally:
        await client.aclose()


def _decoder(settings: Settings, stream: StreamSpec) -> ChunkDecoder:
    return ChunkDecoder(
        workers=settings.export_workers,
        max_entry_bytes=settings.max_entry_bytes,
        max_io_elements=settings.max_io_elements,
        stream=stream,
    )


async def discard_uncommitted(
    client: aioredis.Redis, source: StreamSource, dataset: Dataset
) -> list[Path]:
    """Delete files of batches never acknowledged, except the one the first batch replaces.

    A file is committed exactly when the entry it is named after is acknowledged. The
    file named after this consumer's first pending entry is left in place: the first
    batch re-reads all own pending entries, gets that same name and replaces it.
    """
    summary = await client.xpending(source.stream, source.group)
    if not summary["pending"]:
        return []
    low, high = id_key(entry_id(summary["min"])), id_key(entry_id(summary["max"]))
    named = [(first_id_of(path), path) for path in data_files(dataset.root)]
    candidates = [(fid, p) for fid, p in named if fid and low <= id_key(fid) <= high]
    if not candidates:
        return []
    own = await client.xpending_range(
        source.stream, source.group, min="-", max="+", count=1, consumername=source.consumer
    )
    own_first = entry_id(own[0]["message_id"]) if own else None
    names = {fid for fid, _ in candidates if fid != own_first}
    uncommitted = {fid for fid in names if await _pending(client, source, fid)}
    stale = [path for fid, path in candidates if fid in uncommitted]
    if stale:
        _log().warning("discarding unacknowledged files", files=[str(p) for p in stale])
        dataset.discard(stale)
    return stale


async def _pending(client: aioredis.Redis, source: StreamSource, stream_id: str) -> bool:
    rows = await client.xpending_range(
        source.stream, source.group, min=stream_id, max=stream_id, count=1
    )
    return bool(rows)


@contextlib.contextmanager
def _signals(exporter: Exporter) -> Iterator[None]:
    """First SIGTERM/SIGINT: flush and stop. Second: exit now (pending entries are redone)."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(signum: int) -> None:
        received.append(signum)
        if len(received) > 1:
            _log().warning("second signal, exiting without flushing", signal=signum)
            os._exit(128 + signum)
        _log().info("stopping: flushing the current batch", signal=signum)
        exporter.stop()

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
