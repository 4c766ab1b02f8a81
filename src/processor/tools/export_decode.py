"""Stream entries to Arrow chunks, in this process or in a pool of worker processes.

Decoding (the contract decoder) and column building are the export's CPU cost; the GIL
keeps them on one core. With ``workers > 0`` each delivery is decoded in a worker process
(entries are sent pickled, the Arrow chunk comes back through Arrow IPC) while the main
process keeps reading, writing and acknowledging. The result is the same either way:
:func:`decode_chunk` is the one code path, and the exporter consumes results in delivery
order.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa

from processor.adapters.redis_stream import Fields
from processor.core.contract import decode_entry
from processor.core.records import Record, Rejection
from processor.tools.export_schema import records_to_batch

Entries = Sequence[tuple[str, Fields]]


@dataclass(frozen=True, slots=True)
class Decoded:
    """One delivery decoded: its rows as an Arrow chunk, and its rejections in order."""

    chunk: pa.RecordBatch | None = None
    rejections: list[tuple[str, Rejection]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return 0 if self.chunk is None else int(self.chunk.num_rows)


EMPTY: Final = Decoded()


def decode_chunk(entries: Entries, max_entry_bytes: int, max_io_elements: int) -> Decoded:
    """Decode ``entries`` with the contract decoder into one Arrow chunk and rejections."""
    records: list[Record] = []
    rejections: list[tuple[str, Rejection]] = []
    for sid, fields in entries:
        decoded = decode_entry(
            sid, fields, max_entry_bytes=max_entry_bytes, max_io_elements=max_io_elements
        )
        if type(decoded) is Record:
            records.append(decoded)
        else:
            rejections.append((sid, decoded))  # type: ignore[arg-type]
    return Decoded(records_to_batch(records) if records else None, rejections)


def _ready() -> int:
    return os.getpid()


def _init_worker(parent: int) -> None:
    # The main process owns shutdown: a worker ignores SIGINT/SIGTERM and exits when the
    # main process is gone (SIGKILL leaves it blocked on a queue nobody will write to).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


class ChunkDecoder:
    """Decodes deliveries in this process (``workers == 0``) or in worker processes."""

    def __init__(self, *, workers: int, max_entry_bytes: int, max_io_elements: int) -> None:
        self.workers = workers
        self._limits = (max_entry_bytes, max_io_elements)
        self._pool: ProcessPoolExecutor | None = None
        if workers:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of an event loop
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )

    async def start(self) -> None:
        """Start every worker now: a spawned worker takes a second to import the decoder."""
        if self._pool is not None:
            started = [self._pool.submit(_ready) for _ in range(self.workers)]
            await asyncio.gather(*map(asyncio.wrap_future, started))

    def submit(self, entries: Entries) -> asyncio.Future[Decoded]:
        """A future of ``entries`` decoded (already done when decoding in this process)."""
        if self._pool is None or not entries:
            future: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
            future.set_result(decode_chunk(entries, *self._limits) if entries else EMPTY)
            return future
        return asyncio.wrap_future(self._pool.submit(decode_chunk, entries, *self._limits))

    @staticmethod
    def discard(future: asyncio.Future[Decoded]) -> None:
        """Drop a decode whose result will not be used (its entries stay pending)."""
        if not future.cancel() and not future.cancelled():
            future.exception()  # retrieved, so a failed decode is not reported as lost

    def close(self) -> None:
        """Stop the workers; decodes not started are dropped (their entries stay pending)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
