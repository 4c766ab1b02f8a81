"""Stream entries to Arrow chunks, in this process or in a pool of worker processes.

Decoding and column building are the export's CPU cost. Two ways in:

- :meth:`ChunkDecoder.read_new` (the hot path): the decoder reads the next new entries
  itself (``XREADGROUP … >`` on a connection of its own, in the exporter's consumer name)
  and decodes them, so an entry never exists as a Python object in the exporter: what
  comes back is the Arrow chunk, the ids read (one string) and the rejections. With
  ``workers > 0`` this runs in worker processes, else in two reading threads of the
  exporter. With the C extension the reply is kept as bytes and its payloads parsed
  straight into Arrow buffers without the GIL (:func:`_read_raw`).
- :meth:`ChunkDecoder.submit`: entries the exporter read itself (its own pending entries
  on start, entries claimed from idle consumers) are sent to be decoded.

The rows and rejections are the same either way: the contract decoder's. The native
builder takes only entries the contract decoder certainly accepts and writes exactly
their rows; every other entry goes through :func:`decode_entries`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, Final

import pyarrow as pa
import redis
from redis.exceptions import ResponseError

from processor.adapters.redis_stream import Fields
from processor.core.contract import decode_entry, decode_run
from processor.core.gc_tuning import tune_for_throughput
from processor.core.records import Record, Rejection
from processor.logs import get_logger
from processor.tools.export_schema import batch_from_buffers, records_to_batch

try:  # the native column builder (optional: without a compiler the Python path runs)
    from processor.tools._export_columns import export_columns, export_reply, resp_scan
except ImportError:  # pragma: no cover - a build without the C extension
    export_columns = export_reply = resp_scan = None  # type: ignore[assignment]

NATIVE: Final = export_columns is not None
READ_THREADS: Final = 2 if NATIVE else 1

Entries = Sequence[tuple[str, Fields]]


@dataclass(frozen=True, slots=True)
class Decoded:
    """Entries decoded: their rows as an Arrow chunk, and their rejections in order.

    ``ids`` and ``rejected`` are filled only when the decoder read the entries itself
    (:func:`read_new`): every id read, space-separated in stream order, and the fields of
    each rejected entry (for its dead letter), in the order of ``rejections``.
    """

    chunk: pa.RecordBatch | None = None
    rejections: list[tuple[str, Rejection]] = field(default_factory=list)
    ids: str = ""
    rejected: list[Fields] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return 0 if self.chunk is None else int(self.chunk.num_rows)

    def id_list(self) -> list[str]:
        """The ids read by the decoder, in stream order (empty when it read nothing)."""
        return self.ids.split(" ") if self.ids else []


EMPTY: Final = Decoded()


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Where and as whom a decoder reads new entries: Redis URL, stream, group, consumer."""

    url: str = field(repr=False)  # may hold a password: never in a repr or log
    stream: str
    group: str
    consumer: str


def decode_entries(
    entries: Iterable[tuple[str, Fields]], max_entry_bytes: int, max_io_elements: int
) -> tuple[list[Record], list[tuple[str, Rejection, Fields]]]:
    """Decode ``entries`` with the contract decoder: records, and rejections with fields."""
    records: list[Record] = []
    rejections: list[tuple[str, Rejection, Fields]] = []
    for sid, fields in entries:
        decoded = decode_entry(
            sid, fields, max_entry_bytes=max_entry_bytes, max_io_elements=max_io_elements
        )
        if type(decoded) is Record:
            records.append(decoded)
        else:
            rejections.append((sid, decoded, fields))  # type: ignore[arg-type]
    return records, rejections


def decode_chunk(entries: Entries, max_entry_bytes: int, max_io_elements: int) -> Decoded:
    """Decode ``entries`` with the contract decoder into one Arrow chunk and rejections."""
    records, rejections = decode_entries(entries, max_entry_bytes, max_io_elements)
    return Decoded(
        records_to_batch(records) if records else None,
        [(sid, rejection) for sid, rejection, _ in rejections],
    )


def read_new(
    spec: StreamSpec, count: int, block_ms: int, max_entry_bytes: int, max_io_elements: int
) -> Decoded:
    """Read up to ``count`` new entries (XREADGROUP ``>``) and decode them.

    The entries become pending under ``spec.consumer`` as they are read, exactly as when
    the exporter reads them: the exporter acknowledges them once their rows are durable.
    """
    return _read_with(_client(spec), spec, count, block_ms, max_entry_bytes, max_io_elements)


def _read_with(
    client: redis.Redis,
    spec: StreamSpec,
    count: int,
    block_ms: int,
    max_entry_bytes: int,
    max_io_elements: int,
) -> Decoded:
    if export_reply is not None:
        decoded = _read_raw(client, spec, count, block_ms, max_entry_bytes, max_io_elements)
        if decoded is not None:
            return decoded
    response = client.xreadgroup(
        spec.group, spec.consumer, {spec.stream: ">"}, count=count, block=block_ms
    )
    items = _stream_items(response)
    if not items:
        return EMPTY
    ids = b" ".join(map(_first, items)).decode("ascii")  # one decode, not one per entry
    if export_columns is not None:
        return decode_items(items, ids, max_entry_bytes, max_io_elements)
    flats = list(map(_second, items))
    del response, items  # the reply is now held by ``flats`` only, and freed run by run
    # A run's records become Arrow columns while they are still in the CPU's caches, and
    # its part of the reply is freed then too (a quarter less CPU per entry than
    # decoding the whole read, building its columns, then freeing it).
    batches: list[pa.RecordBatch] = []
    rejections: list[tuple[str, Rejection, Fields]] = []
    for records, rejected in _decode_runs(
        ids.split(" "), flats, max_entry_bytes, max_io_elements, release=True
    ):
        if records:
            batches.append(records_to_batch(records))
        rejections.extend(rejected)
    return Decoded(
        _concat(batches),
        [(sid, rejection) for sid, rejection, _ in rejections],
        ids=ids,
        rejected=[fields for _, _, fields in rejections],
    )


# XREADGROUP's reply when BLOCK ran out (RESP2), and an empty one
_EMPTY_REPLIES: Final = frozenset({b"*-1\r\n", b"*0\r\n"})
_reading = threading.local()  # each reading thread's reply buffer, kept between reads


def _read_raw(
    client: redis.Redis,
    spec: StreamSpec,
    count: int,
    block_ms: int,
    max_entry_bytes: int,
    max_io_elements: int,
) -> Decoded | None:
    """Read new entries with the reply kept as bytes, and build their columns natively.

    hiredis would make a Python object of every entry and field (about a quarter of the
    export's CPU); here the reply is received into one buffer and the native builder reads
    it in place. None when the connection speaks RESP3, or failed before a whole reply came
    (the caller then reads through redis-py, which reconnects and retries; entries the
    lost reply delivered stay pending, as with any lost reply, and are exported on restart).
    """
    assert export_reply is not None
    pool = client.connection_pool
    connection: Any = pool.get_connection()
    try:
        if str(connection.protocol) != "2":
            return None
        command = connection.pack_command(
            "XREADGROUP",
            "GROUP",
            spec.group,
            spec.consumer,
            "COUNT",
            count,
            "BLOCK",
            block_ms,
            "STREAMS",
            spec.stream,
            ">",
        )
        connection.send_packed_command(command)
        buffer, end, received = _receive(connection)
        if received != end:  # more than the reply came: the connection is not trusted
            connection.disconnect()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        connection.disconnect()
        _log_fallback(exc)
        return None
    except BaseException:
        connection.disconnect()  # a reply may be left unread: not reusable
        raise
    finally:
        pool.release(connection)
    if buffer[0] == ord("-"):  # an error reply (NOGROUP after a Redis restart, say)
        raise ResponseError(bytes(buffer[1 : end - 2]).decode("utf-8", "replace"))
    if end <= 5 and bytes(buffer[:end]) in _EMPTY_REPLIES:
        return EMPTY
    return decode_reply(buffer, end, max_entry_bytes, max_io_elements)


def decode_items(items: list[Any], ids: str, max_entry_bytes: int, max_io_elements: int) -> Decoded:
    """The entries of a parsed XREADGROUP reply (``[id, fields]`` items; ``ids`` theirs,
    space-separated) through the native column builder."""
    assert export_columns is not None
    rows, buffers, nulls, skipped = export_columns(items, max_entry_bytes, max_io_elements)
    chunk = batch_from_buffers(rows, buffers, nulls)
    left = [items[index] for index in skipped]
    return _merge(chunk, skipped, left, ids, max_entry_bytes, max_io_elements)


def decode_reply(
    buffer: bytearray, end: int, max_entry_bytes: int, max_io_elements: int
) -> Decoded:
    """The entries of a whole raw RESP2 XREADGROUP reply of one stream (``buffer[:end]``)
    through the native column builder."""
    assert export_reply is not None
    built = export_reply(buffer, end, max_entry_bytes, max_io_elements)
    rows, buffers, nulls, skipped, left, ids = built
    chunk = batch_from_buffers(rows, buffers, nulls)
    return _merge(chunk, skipped, left, ids.decode("ascii"), max_entry_bytes, max_io_elements)


def _receive(connection: Any) -> tuple[bytearray, int, int]:
    """One whole reply from the connection's socket, as bytes: the buffer, the reply's end
    and the end of the bytes received (beyond the reply only if Redis sent more)."""
    assert resp_scan is not None
    sock = connection._sock  # the connected socket (plain, TLS or Unix) of redis-py 8
    buffer: bytearray = getattr(_reading, "buffer", None) or bytearray(1 << 20)
    filled, pos = 0, 0
    stack: tuple[int, ...] | None = (1,)
    while stack is not None:
        if filled == len(buffer):
            buffer.extend(bytes(len(buffer)))
        with memoryview(buffer) as view:
            got = sock.recv_into(view[filled:])
        if not got:
            raise redis.ConnectionError("Redis closed the connection during a read")
        filled += got
        pos, stack = resp_scan(buffer, filled, pos, stack)
    _reading.buffer = buffer
    return buffer, pos, filled


def _log_fallback(exc: BaseException) -> None:
    get_logger("export").warning("raw read failed, reading through redis-py", error=str(exc))


def _merge(
    chunk: pa.RecordBatch,
    skipped: list[int],
    left: list[Any],
    ids: str,
    max_entry_bytes: int,
    max_io_elements: int,
) -> Decoded:
    """The native rows of a read with the entries the builder left (``skipped``: their
    indices in the read, ``left``: their ``[id, fields]``) decoded by the contract
    decoder, which accepts or rejects them; their rows are put back in stream order."""
    rows = chunk.num_rows
    if not skipped:
        return Decoded(chunk if rows else None, ids=ids)
    pieces: list[pa.RecordBatch] = []
    rejections: list[tuple[str, Rejection, Fields]] = []
    taken = 0  # native rows placed so far
    for before, (index, item) in enumerate(zip(skipped, left, strict=True)):
        native_rows = index - before - taken  # native rows between the previous and this
        if native_rows:
            pieces.append(chunk.slice(taken, native_rows))
            taken += native_rows
        sid = item[0].decode("ascii")
        records, rejected = decode_entries(
            _entries([sid], [item[1]]), max_entry_bytes, max_io_elements
        )
        if records:
            pieces.append(records_to_batch(records))
        rejections.extend(rejected)
    if taken < rows:
        pieces.append(chunk.slice(taken))
    return Decoded(
        _concat(pieces),
        [(sid, rejection) for sid, rejection, _ in rejections],
        ids=ids,
        rejected=[fields for _, _, fields in rejections],
    )


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch | None:
    if len(batches) > 1:
        return pa.concat_batches(batches)
    return batches[0] if batches else None


_first: Final = itemgetter(0)
_second: Final = itemgetter(1)
_names: Final = itemgetter(0, 2, 4)
_values: Final = (itemgetter(1), itemgetter(3), itemgetter(5))
_USUAL_NAMES: Final = frozenset({(b"v", b"imei", b"payload")})
# Entries decoded together by decode_run: a run with an invalid entry is decoded again
# entry by entry (which names the reasons), so a run is short enough for that to cost
# little and long enough for the per-run checks to cost nothing per entry.
RUN: Final = 1_000


def decode_read(
    ids: list[str], flats: list[Any], max_entry_bytes: int, max_io_elements: int
) -> tuple[list[Record], list[tuple[str, Rejection, Fields]]]:
    """Decode the entries of a raw XREADGROUP reply (ids, and flat field lists).

    The same records and rejections as :func:`decode_entries` of the entries redis-py
    would build: runs of entries of the usual shape (``v``, ``imei``, ``payload``, in
    that order) go through :func:`~processor.core.contract.decode_run`, anything else or
    a run it does not take entry by entry.
    """
    records: list[Record] = []
    rejections: list[tuple[str, Rejection, Fields]] = []
    for more, rejected in _decode_runs(ids, flats, max_entry_bytes, max_io_elements):
        records.extend(more)
        rejections.extend(rejected)
    return records, rejections


def _decode_runs(
    ids: list[str],
    flats: list[Any],
    max_entry_bytes: int,
    max_io_elements: int,
    *,
    release: bool = False,
) -> Iterator[tuple[list[Record], list[tuple[str, Rejection, Fields]]]]:
    """:func:`decode_read`, a run of at most ``RUN`` entries at a time; with ``release``,
    each run's field lists are replaced by None in ``flats`` once taken."""
    for start in range(0, len(flats), RUN):
        run_ids, run = ids[start : start + RUN], flats[start : start + RUN]
        if release:
            flats[start : start + RUN] = repeat(None, len(run))
        decoded = None
        if set(map(len, run)) == {6} and set(map(_names, run)) == _USUAL_NAMES:
            versions, imeis, payloads = (list(map(get, run)) for get in _values)
            decoded = decode_run(
                run_ids,
                versions,
                imeis,
                payloads,
                max_entry_bytes=max_entry_bytes,
                max_io_elements=max_io_elements,
            )
            del versions, imeis, payloads
        if decoded is None:
            decoded_alone = decode_entries(_entries(run_ids, run), max_entry_bytes, max_io_elements)
            del run
            yield decoded_alone
        else:
            del run  # the run's reply is freed now, while its objects are in cache
            yield decoded, []


def _stream_items(response: Any) -> list[Any]:
    """The ``[id, [field, value, …]]`` items of a raw XREADGROUP reply (RESP2 or RESP3)."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else (s[1] for s in response)
    return [item for items in streams for item in items]


def _entries(ids: list[str], flats: Iterable[Any]) -> Iterator[tuple[str, Fields]]:
    """Entries with the field dicts redis-py would build (``dict(zip(it, it))``).

    The usual ``v, imei, payload`` list becomes that same dict without the generic
    pairing. An entry without fields (deleted since delivered) is acknowledged only.
    """
    for sid, flat in zip(ids, flats, strict=True):
        if not flat:
            continue
        if len(flat) == 6 and flat[0] == b"v" and flat[2] == b"imei" and flat[4] == b"payload":
            yield sid, {b"v": flat[1], b"imei": flat[3], b"payload": flat[5]}
        else:
            it = iter(flat)
            yield sid, dict(zip(it, it, strict=False))


_clients: dict[StreamSpec, redis.Redis] = {}  # a worker process's connections


def _client(spec: StreamSpec) -> redis.Redis:
    client = _clients.get(spec)
    if client is None:
        client = _clients[spec] = _raw_client(spec)
    return client


def _raw_client(spec: StreamSpec) -> redis.Redis:
    """A connection whose XREADGROUP replies are left as parsed (no field dicts built).

    It speaks RESP2 (redis-py 8 would choose RESP3), the protocol whose replies the
    native builder reads as bytes (see :func:`_read_raw`)."""
    client = redis.Redis.from_url(spec.url, protocol=2)
    client.set_response_callback("XREADGROUP", _raw)
    return client


def _raw(response: Any, **_options: Any) -> Any:
    return response


def _ready() -> int:
    return os.getpid()


def _init_worker(parent: int) -> None:
    # The main process owns shutdown: a worker ignores SIGINT/SIGTERM and exits when the
    # main process is gone (SIGKILL leaves it blocked on a queue nobody will write to).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    tune_for_throughput()  # like the exporter: many short-lived objects per entry


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


class ChunkDecoder:
    """Decodes deliveries in this process (``workers == 0``) or in worker processes."""

    def __init__(
        self,
        *,
        workers: int,
        max_entry_bytes: int,
        max_io_elements: int,
        stream: StreamSpec | None = None,
    ) -> None:
        self.workers = workers
        self._limits = (max_entry_bytes, max_io_elements)
        self._stream = stream
        self._pool: Executor | None = None
        self._client: redis.Redis | None = None  # the reading thread's (workers == 0)
        if workers:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of an event loop
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
        elif stream is not None:  # reads block on Redis: not in the event loop's thread
            # Two reading threads: one waits for Redis while the other parses its reply
            # (the native column builder parses without the GIL).
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="export-read")
            self._client = _raw_client(stream)

    @property
    def reads(self) -> bool:
        """True when :meth:`read_new` may be used (the decoder knows the stream)."""
        return self._stream is not None

    async def start(self) -> None:
        """Start every worker now: a spawned worker takes a second to import the decoder."""
        if self.workers and self._pool is not None:
            started = [self._pool.submit(_ready) for _ in range(self.workers)]
            await asyncio.gather(*map(asyncio.wrap_future, started))

    def submit(self, entries: Entries) -> asyncio.Future[Decoded]:
        """A future of ``entries`` decoded (already done when decoding in this process)."""
        if not self.workers or self._pool is None or not entries:
            future: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
            future.set_result(decode_chunk(entries, *self._limits) if entries else EMPTY)
            return future
        return asyncio.wrap_future(self._pool.submit(decode_chunk, entries, *self._limits))

    def read_new(self, count: int, block_ms: int) -> asyncio.Future[Decoded]:
        """A future of the next new entries read (at most ``count``, waiting up to
        ``block_ms`` for one) and decoded, by a worker or the reading thread."""
        if self._stream is None or self._pool is None:
            raise RuntimeError("this decoder does not read the stream, or is closed")
        if self._client is not None:
            args = (self._client, self._stream, count, block_ms, *self._limits)
            return asyncio.wrap_future(self._pool.submit(_read_with, *args))
        return asyncio.wrap_future(
            self._pool.submit(read_new, self._stream, count, block_ms, *self._limits)
        )

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
        if self._client is not None:
            self._client.close()
            self._client = None
