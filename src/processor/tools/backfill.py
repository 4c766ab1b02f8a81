"""Recompute ``position_attributes`` from stored positions with the current IO mappings.

When an organiser corrects an IO mapping (a multiplier, a label), attributes already
derived are stale. A backfill reads ``positions`` in a time range — optionally only some
devices or one device model — in ``(device_id, ts)`` order and in chunks, decodes each
position's raw IO with the current mapping, and upserts the attribute rows that differ.
``positions`` is only ever read.

Each chunk's writes and the run's progress (the last key done) commit in one transaction,
in ``processor.backfill_progress``, so a run interrupted at any point resumes after the
last committed chunk and ends with the same table as an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import orjson

from processor.adapters.mappings import MappingCache
from processor.core.attributes import ModelMapping, encode_attributes
from processor.core.records import IoValue

DEFAULT_CHUNK: Final = 20_000


class BackfillError(Exception):
    """A backfill cannot run as asked (bad range, unknown model, no device selected)."""


@dataclass(frozen=True, slots=True)
class BackfillSpec:
    """What to recompute: ``start <= ts < end``, for these devices (IMEIs) or this model."""

    start: dt.datetime
    end: dt.datetime
    devices: tuple[int, ...] = ()
    model: str | None = None

    def key(self) -> str:
        """The run key: equal specs share progress (a rerun resumes the same run)."""
        return hashlib.sha256(
            orjson.dumps(self.as_json(), option=orjson.OPT_SORT_KEYS)
        ).hexdigest()[:24]

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "devices": sorted(self.devices),
            "model": self.model,
        }


@dataclass(slots=True)
class Summary:
    """What a run did (cumulative over its resumptions)."""

    rows_seen: int = 0
    rows_changed: int = 0
    session_rows: int = 0
    chunks: int = 0
    resumed_from: tuple[int, dt.datetime] | None = None
    seconds: float = 0.0
    dry_run: bool = False
    selected_devices: int | None = None

    @property
    def rate(self) -> float:
        """Positions per second in this session (a resumed run counts only its own)."""
        return self.session_rows / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[int], None]

# --- pure: stored IO back to decoder input ----------------------------------------------


def stored_io(raw: str) -> dict[int, IoValue]:
    """The ``positions.io`` JSON back to ``{io_id: int | bytes}`` (bytes are stored as hex)."""
    parsed: dict[str, Any] = orjson.loads(raw)
    io: dict[int, IoValue] = dict(zip(map(int, parsed), parsed.values(), strict=True))
    # Keys account for two quotes each; more quotes mean string values (hex of variable-length
    # elements), which most records do not have.
    if raw.count('"') > 2 * len(io):
        for io_id, value in io.items():
            if isinstance(value, str):
                io[io_id] = bytes.fromhex(value)
    return io


def attribute_rows(
    rows: Iterable[Sequence[Any]], cache: MappingCache
) -> list[tuple[int, dt.datetime, str, int]]:
    """``(device_id, ts, attributes JSON, mapping version)`` for ``(device_id, ts, io)`` rows."""
    out: list[tuple[int, dt.datetime, str, int]] = []
    mappings: dict[int, ModelMapping] = {}
    for device_id, ts, io in rows:
        mapping = mappings.get(device_id)
        if mapping is None:
            mapping = mappings[device_id] = cache.mapping(cache.model_for(device_id))
        text = encode_attributes(stored_io(io), mapping)  # the bytes the live path writes
        out.append((device_id, ts, text.decode(), mapping.version))
    return out


# --- SQL --------------------------------------------------------------------------------

_CHUNK = """
SELECT device_id, ts, io::text
FROM positions
WHERE ts >= $1 AND ts < $2
  AND ($3::bigint[] IS NULL OR device_id = ANY($3::bigint[]))
  AND (device_id, ts) > ($4, $5)
ORDER BY device_id, ts
LIMIT $6
"""

_COUNT = """
SELECT count(*) FROM positions
WHERE ts >= $1 AND ts < $2 AND ($3::bigint[] IS NULL OR device_id = ANY($3::bigint[]))
  AND (device_id, ts) > ($4, $5)
"""

_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS backfill_stage (
    device_id bigint, ts timestamptz, attributes text, mapping_version integer
) ON COMMIT DELETE ROWS
"""

# Only rows whose content differs are written: unchanged ones cost no WAL, and the
# count is the number of positions whose attributes the new mapping changed. Content is
# compared as jsonb (the same object however its text is spaced or ordered).
_UPSERT = """
WITH written AS (
    INSERT INTO position_attributes AS a (device_id, ts, attributes, mapping_version)
    SELECT device_id, ts, attributes::json, mapping_version FROM backfill_stage
    ON CONFLICT (device_id, ts) DO UPDATE
    SET attributes = EXCLUDED.attributes, mapping_version = EXCLUDED.mapping_version
    WHERE a.attributes::jsonb IS DISTINCT FROM EXCLUDED.attributes::jsonb
       OR a.mapping_version IS DISTINCT FROM EXCLUDED.mapping_version
    RETURNING 1
)
SELECT count(*) FROM written
"""

_DIFFERING = """
SELECT count(*) FROM backfill_stage s
LEFT JOIN position_attributes a USING (device_id, ts)
WHERE a.attributes::jsonb IS DISTINCT FROM s.attributes::jsonb
   OR a.mapping_version IS DISTINCT FROM s.mapping_version
"""

_LOAD_PROGRESS = """
SELECT last_device_id, last_ts, rows_seen, rows_changed, finished_at
FROM processor.backfill_progress WHERE run_key = $1
"""

_START = """
INSERT INTO processor.backfill_progress (run_key, spec) VALUES ($1, $2::jsonb)
ON CONFLICT (run_key) DO UPDATE
SET spec = EXCLUDED.spec, last_device_id = NULL, last_ts = NULL, rows_seen = 0,
    rows_changed = 0, started_at = now(), updated_at = now(), finished_at = NULL
"""

_ADVANCE = """
UPDATE processor.backfill_progress
SET last_device_id = $2, last_ts = $3, rows_seen = rows_seen + $4,
    rows_changed = rows_changed + $5, updated_at = now()
WHERE run_key = $1
"""

_FINISH = "UPDATE processor.backfill_progress SET finished_at = now() WHERE run_key = $1"

# Below every real key: device ids are positive IMEIs.
_BEFORE_ALL: Final = (-1, dt.datetime(1970, 1, 1, tzinfo=dt.UTC))


# --- the run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Decoded attribute rows of one chunk, and the last position key they cover."""

    rows: list[tuple[int, dt.datetime, str, int]]
    last: tuple[int, dt.datetime]


@dataclass(slots=True)
class Backfill:
    """One backfill run: :meth:`prepare`, then :meth:`run`.

    With a second connection (``writer``), reading and decoding the next chunk overlaps
    with writing the current one; chunks are still written, and progress recorded, in order.
    """

    conn: asyncpg.Connection
    spec: BackfillSpec
    cache: MappingCache
    chunk: int = DEFAULT_CHUNK
    dry_run: bool = False
    restart: bool = False
    writer: asyncpg.Connection | None = None
    device_ids: list[int] | None = None
    summary: Summary = field(default_factory=Summary)
    _after: tuple[int, dt.datetime] = _BEFORE_ALL

    @property
    def _out(self) -> asyncpg.Connection:
        return self.writer if self.writer is not None else self.conn

    async def prepare(self) -> int:
        """Load the mappings, select the devices, find where to start; return rows to do."""
        if self.spec.end <= self.spec.start:
            raise BackfillError("--to must be after --from")
        await self.cache.load(self.conn)
        self.device_ids = await self._select_devices()
        self.summary.dry_run = self.dry_run
        self.summary.selected_devices = None if self.device_ids is None else len(self.device_ids)
        await self._out.execute(_STAGE)
        self._after = await self._resume_point()
        return int(await self.conn.fetchval(_COUNT, *self._range(), *self._after))

    async def run(self, progress: Progress | None = None) -> Summary:
        """Process every chunk after the resume point; ``progress(n)`` after each chunk."""
        started = time.perf_counter()
        async with aclosing(self._ordered_chunks()) as chunks:  # stops the read-ahead on error
            async for chunk in chunks:
                await self._write(chunk)
                if progress is not None:
                    progress(len(chunk.rows))
        if not self.dry_run:
            await self._out.execute(_FINISH, self.spec.key())
        self.summary.seconds += time.perf_counter() - started
        return self.summary

    def _range(self) -> tuple[dt.datetime, dt.datetime, list[int] | None]:
        return self.spec.start, self.spec.end, self.device_ids

    async def _chunks(self) -> AsyncGenerator[_Chunk, None]:
        """Fetch and decode the chunks after the resume point, in key order."""
        after = self._after
        while rows := await self.conn.fetch(_CHUNK, *self._range(), *after, self.chunk):
            after = (rows[-1][0], rows[-1][1])
            yield _Chunk(attribute_rows(rows, self.cache), after)

    async def _ordered_chunks(self) -> AsyncGenerator[_Chunk, None]:
        """The chunks; with a writer connection, read ahead (two chunks) while writing."""
        if self.writer is None:
            async for chunk in self._chunks():
                yield chunk
            return
        queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(self._read_ahead(queue))
        try:
            while (item := await _next(queue, reader)) is not None:
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_ahead(self, queue: asyncio.Queue[_Chunk | None]) -> None:
        async for chunk in self._chunks():
            await queue.put(chunk)
        await queue.put(None)

    async def _write(self, chunk: _Chunk) -> None:
        """Upsert one chunk's changed rows with the run's progress, in one transaction."""
        out = self._out
        async with out.transaction():
            await out.copy_records_to_table("backfill_stage", records=chunk.rows)
            if self.dry_run:
                changed = int(await out.fetchval(_DIFFERING))
            else:
                changed = int(await out.fetchval(_UPSERT))
                await out.execute(_ADVANCE, self.spec.key(), *chunk.last, len(chunk.rows), changed)
        self.summary.rows_seen += len(chunk.rows)
        self.summary.session_rows += len(chunk.rows)
        self.summary.rows_changed += changed
        self.summary.chunks += 1

    async def _resume_point(self) -> tuple[int, dt.datetime]:
        """After the last chunk of an unfinished earlier run of this spec, else from the start.

        A dry run always starts from the start and records no progress.
        """
        if self.dry_run:
            return _BEFORE_ALL
        key = self.spec.key()
        row = await self._out.fetchrow(_LOAD_PROGRESS, key)
        unfinished = row is not None and row["finished_at"] is None
        if unfinished and not self.restart and row["last_device_id"] is not None:
            self.summary.resumed_from = (int(row["last_device_id"]), row["last_ts"])
            self.summary.rows_seen = int(row["rows_seen"])
            self.summary.rows_changed = int(row["rows_changed"])
            return self.summary.resumed_from
        await self._out.execute(_START, key, orjson.dumps(self.spec.as_json()).decode())
        return _BEFORE_ALL

    async def _select_devices(self) -> list[int] | None:
        """The device ids to recompute; ``None`` means every device."""
        if self.spec.devices:
            return sorted(set(self.spec.devices))
        if self.spec.model is None:
            return None
        return await self._devices_of_model(self.spec.model)

    async def _devices_of_model(self, model: str) -> list[int]:
        known = self.cache.current.devices
        default = self.cache.default_model
        if model not in self.cache.current.models and model != default:
            raise BackfillError(f"no IO mappings for device model {model!r}")
        chosen = {d for d, m in known.items() if (m or default) == model}
        if model == default:
            # Devices missing from the devices table are decoded with the default model.
            seen = await self.conn.fetch(
                "SELECT DISTINCT device_id FROM positions WHERE ts >= $1 AND ts < $2",
                self.spec.start,
                self.spec.end,
            )
            chosen |= {r[0] for r in seen if r[0] not in known}
        if not chosen:
            raise BackfillError(f"no device uses model {model!r}")
        return sorted(chosen)


async def _next(queue: asyncio.Queue[_Chunk | None], reader: asyncio.Task[None]) -> _Chunk | None:
    """The next chunk from ``queue``; the reader's error if it fails before providing one."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        error = reader.exception()
        if error is not None:
            getter.cancel()
            raise error
    return await getter
