"""The idempotent batch writer of positions (and their attributes) into PostgreSQL.

Two paths, one transaction per batch (rule 3: any entry may be delivered any number of
times and the tables end the same):

- direct: records newer than anything this writer has committed for their device cannot
  be stored yet (unless another writer stored them), so they are COPYed straight into
  ``positions`` and ``position_attributes`` — about half the database work of staging.
  This runs in a savepoint; if a key turns out to exist after all (another instance, a
  batch being written beside this one), the savepoint is rolled back and those records
  take the staged path too (counted in ``processor_write_fallbacks_total``);
- staged: everything else (a device's first batch, late or resent records) is COPYed
  into a per-connection temporary table and moved with ``INSERT … ON CONFLICT DO
  NOTHING``, attributes riding in the same staging rows. Rows go in (device_id, ts)
  order (staged inserts of concurrent batches take their row locks in one order); of
  records repeating a key in one batch, the first in stream order is kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
import orjson

from processor.adapters.partitions import PartitionManager
from processor.adapters.pgcopy import (
    ATTRIBUTE_COLUMNS,
    POSITION_COLUMNS,
    position_rows,
)
from processor.core import metrics
from processor.core.attributes import AttributeRow
from processor.core.jsonenc import io_json
from processor.core.records import Record
from processor.settings import Settings

# ``ord``: the record's place in its batch, so that of records repeating a key the first
# in stream order is the one stored (the one the domain saw first).
STAGE_COLUMNS = (*POSITION_COLUMNS, "attributes", "mapping_version", "ord")

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS positions_stage (
    device_id bigint, ts bigint, received_at bigint, lat float8, lon float8, alt integer,
    angle smallint, satellites smallint, speed integer, priority smallint, event_io integer,
    codec smallint, generation smallint, io jsonb, stream_id text, attributes json,
    mapping_version integer, ord integer
) ON COMMIT DELETE ROWS;
"""

_MOVE = """
INSERT INTO positions (device_id, ts, received_at, lat, lon, alt, angle, satellites, speed,
                       priority, event_io, codec, generation, io, stream_id)
SELECT device_id, timestamptz 'epoch' + ts * interval '1 millisecond',
       timestamptz 'epoch' + received_at * interval '1 millisecond',
       lat, lon, alt, angle, satellites, speed, priority, event_io, codec, generation, io,
       stream_id
FROM positions_stage
ORDER BY device_id, ts, ord
ON CONFLICT DO NOTHING
"""
# The attributes of every staged position. Only positions new to the table lack an
# attributes row (both are written in one transaction), so DO NOTHING leaves a redelivered
# position's attributes as first stored, and fills them in for a position stored while
# attribute decoding was off.
_MOVE_ATTRIBUTES = """
INSERT INTO position_attributes (device_id, ts, attributes, mapping_version)
SELECT device_id, timestamptz 'epoch' + ts * interval '1 millisecond', attributes,
       mapping_version
FROM positions_stage
ORDER BY device_id, ts, ord
ON CONFLICT DO NOTHING
"""


class AttributeSource(Protocol):
    """Decodes the attributes of records (``MappingCache`` is the one the service uses)."""

    def rows(self, records: Sequence[Record], *, count: bool = True) -> list[AttributeRow]:
        """One attributes row per record, in the records' order (``count``: count the
        records of unknown devices in the metrics; False when decoding them again)."""
        ...

    def copy_data(self, records: Sequence[Record]) -> bytes:
        """The binary COPY data of the records' ``position_attributes`` rows."""
        ...


def stage_row(
    record: Record, attributes: AttributeRow | None = None, ord_: int = 0
) -> tuple[Any, ...]:
    """One staging row in STAGE_COLUMNS order (attributes null when not decoded)."""
    return (
        record.device_id,
        record.ts,
        record.received_at,
        record.lat,
        record.lon,
        record.alt,
        record.angle,
        record.sat,
        record.speed,
        record.priority,
        record.event_io,
        record.codec,
        record.generation,
        io_json(record.io),
        record.stream_id,
        None if attributes is None else attributes[2],
        None if attributes is None else attributes[3],
        ord_,
    )


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: binary json/jsonb as raw JSON bytes, and the staging tables."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + value,
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        schema="pg_catalog",
        encoder=lambda value: value,
        decoder=orjson.loads,
        format="binary",
    )
    await conn.execute(_CREATE_STAGE)


class PositionsStore:
    """Writes batches of records; returns how many were not stored before."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, attributes: AttributeSource | None = None
    ) -> None:
        self._pool = pool
        self._partitions = None if settings.timescale == "on" else PartitionManager(settings)
        self.native = settings.timescale != "on"
        self.attributes = attributes
        # Newest ts this writer committed per device (bounded like the device state).
        self._newest: dict[int, int] = {}
        self._capacity = settings.state_capacity

    async def detect_layout(self) -> None:
        """Use native partitions only when positions is natively partitioned."""
        async with self._pool.acquire() as conn:
            kind = await conn.fetchval(
                "SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass('positions')"
            )
        self.native = kind == "p"
        if not self.native:
            self._partitions = None

    async def write(self, records: Sequence[Record]) -> int:
        """Store a batch idempotently in one transaction; return how many rows were new.

        Attributes are decoded for the whole batch and stored with the positions.
        """
        batch = records if isinstance(records, list) else list(records)
        if not batch:
            return 0
        fresh, staged = self._split(batch)
        source = self.attributes
        fresh_data = staged_rows = None
        if source is not None:  # decoded before a connection is taken
            if fresh:
                fresh_data = source.copy_data([batch[i] for i in fresh])
            if staged:
                staged_rows = source.rows([batch[i] for i in staged])
        async with self._pool.acquire() as conn:
            if self._partitions is not None:
                await self._partitions.ensure_for(conn, [r.ts for r in batch])
            async with conn.transaction():
                direct = 0
                if fresh and await self._copy_direct(conn, batch, fresh, fresh_data):
                    direct = len(fresh)
                elif fresh:  # a key exists after all: everything goes staged
                    if source is not None:
                        again = source.rows([batch[i] for i in fresh], count=False)
                        by_index = dict(zip(fresh, again, strict=True))
                        by_index.update(zip(staged, staged_rows or (), strict=True))
                        staged_rows = [by_index[i] for i in range(len(batch))]
                    staged = list(range(len(batch)))
                new = direct
                if staged:
                    new += await self._copy_staged(conn, batch, staged, staged_rows)
        metrics.WRITE_PATH.labels("direct").inc(direct)
        metrics.WRITE_PATH.labels("staged").inc(len(staged))
        self._remember(batch)
        return new

    def _split(self, records: list[Record]) -> tuple[list[int], list[int]]:
        """Indexes of records newer than their device's newest committed ts, and the rest.

        A record must also be newer than the device's fresh records before it in the
        batch, so the fresh ones have distinct keys; a repeat goes staged, where ON
        CONFLICT (run after the direct COPY, in the same transaction) skips it.
        """
        newest = self._newest
        ahead: dict[int, int] = {}  # newest fresh ts per device within this batch
        fresh: list[int] = []
        staged: list[int] = []
        for i, record in enumerate(records):
            device_id = record.device_id
            last = ahead.get(device_id) or newest.get(device_id)
            if last is not None and record.ts > last:
                fresh.append(i)
                ahead[device_id] = record.ts
            else:
                staged.append(i)
        return fresh, staged

    def _remember(self, records: list[Record]) -> None:
        newest = self._newest
        for record in records:
            if record.ts > newest.get(record.device_id, -1):
                newest.pop(record.device_id, None)  # to the end: the least recent go first
                newest[record.device_id] = record.ts
        if len(newest) > self._capacity:  # forget the devices first seen longest ago
            for device_id in list(itertools.islice(newest, len(newest) - self._capacity)):
                del newest[device_id]

    async def _copy_direct(
        self,
        conn: asyncpg.Connection,
        records: list[Record],
        fresh: list[int],
        attributes: bytes | None,
    ) -> bool:
        """COPY the fresh records straight in; False (nothing written) if a key exists."""
        try:
            async with conn.transaction():  # a savepoint: a refused COPY leaves no trace
                rows = position_rows([records[i] for i in fresh])
                await conn.copy_to_table(
                    "positions", source=memoryview(rows), columns=POSITION_COLUMNS, format="binary"
                )
                if attributes is not None:
                    await conn.copy_to_table(
                        "position_attributes",
                        source=memoryview(attributes),
                        columns=ATTRIBUTE_COLUMNS,
                        format="binary",
                    )
        except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
            metrics.WRITE_FALLBACKS.inc()
            return False
        return True

    async def _copy_staged(
        self,
        conn: asyncpg.Connection,
        records: list[Record],
        staged: list[int],
        attributes: Sequence[AttributeRow] | None,
    ) -> int:
        """Stage the records and insert what is new; return how many were new.

        ``attributes``: the staged records' attribute rows, in ``staged`` order.
        """
        if attributes is None:
            rows = (stage_row(records[i], None, i) for i in staged)
        else:
            rows = (
                stage_row(records[i], row, i) for i, row in zip(staged, attributes, strict=True)
            )
        await conn.copy_records_to_table("positions_stage", records=rows, columns=STAGE_COLUMNS)
        status = await conn.execute(_MOVE)
        if attributes is not None:
            await conn.execute(_MOVE_ATTRIBUTES)
        return int(status.rsplit(" ", 1)[1])
