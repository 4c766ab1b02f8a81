"""The idempotent batch writer of positions (and their attributes) into PostgreSQL.

A batch is COPYed (binary) into a per-connection temporary staging table and moved with
``INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING`` in one transaction, so any entry
may be delivered any number of times and the table ends the same (rule 3). The rows that
were really new come back to the caller for attributes, the domain and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from processor.adapters.partitions import PartitionManager
from processor.core.jsonenc import io_json
from processor.core.records import Record
from processor.settings import Settings

STAGE_COLUMNS = (
    "device_id",
    "ts",
    "received_at",
    "lat",
    "lon",
    "alt",
    "angle",
    "satellites",
    "speed",
    "priority",
    "event_io",
    "codec",
    "generation",
    "io",
    "stream_id",
)

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS positions_stage (
    device_id bigint, ts bigint, received_at bigint, lat float8, lon float8, alt integer,
    angle smallint, satellites smallint, speed integer, priority smallint, event_io integer,
    codec smallint, generation smallint, io jsonb, stream_id text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS attributes_stage (
    device_id bigint, ts bigint, attributes jsonb, mapping_version integer
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
ON CONFLICT DO NOTHING
"""
_RETURNING = "RETURNING device_id, (extract(epoch FROM ts) * 1000)::bigint"

_MOVE_ATTRIBUTES = """
INSERT INTO position_attributes (device_id, ts, attributes, mapping_version)
SELECT device_id, timestamptz 'epoch' + ts * interval '1 millisecond', attributes,
       mapping_version
FROM attributes_stage
ON CONFLICT (device_id, ts) DO UPDATE
SET attributes = EXCLUDED.attributes, mapping_version = EXCLUDED.mapping_version
"""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
AttributeRow = tuple[int, int, bytes, int]  # device_id, ts ms, attributes JSON, mapping version
AttributeFn = Callable[[Sequence[Record]], Sequence[AttributeRow]]


def stage_row(record: Record) -> tuple[Any, ...]:
    """One staging row in STAGE_COLUMNS order."""
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
    )


def _attribute_row(row: AttributeRow) -> tuple[int, datetime, bytes, int]:
    return row[0], EPOCH + timedelta(milliseconds=row[1]), row[2], row[3]


def dedupe(records: Sequence[Record]) -> list[Record]:
    """Keep the first record of each (device, ts) in a batch."""
    seen: dict[tuple[int, int], Record] = {}
    for record in records:
        seen.setdefault((record.device_id, record.ts), record)
    return list(seen.values())


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: binary jsonb as raw JSON bytes, and the staging tables."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + value,
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )
    await conn.execute(_CREATE_STAGE)


class PositionsStore:
    """Writes batches of records; returns the records that were not stored before."""

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, attributes: AttributeFn | None = None
    ) -> None:
        self._pool = pool
        self._partitions = None if settings.timescale == "on" else PartitionManager(settings)
        self.native = settings.timescale != "on"
        self.attributes = attributes

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

        Attributes are decoded for the new rows only, in the same transaction.
        """
        unique = dedupe(records)
        if not unique:
            return 0
        async with self._pool.acquire() as conn:
            if self._partitions is not None:
                await self._partitions.ensure_for(conn, [r.ts for r in unique])
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "positions_stage", records=map(stage_row, unique), columns=STAGE_COLUMNS
                )
                if self.attributes is None:  # only the count is needed: no rows sent back
                    status = await conn.execute(_MOVE)
                    return int(status.rsplit(" ", 1)[1])
                inserted = await conn.fetch(_MOVE + _RETURNING)
                keys = {(row[0], row[1]) for row in inserted}
                new = [r for r in unique if (r.device_id, r.ts) in keys]
                if new:
                    await self._write_attributes(conn, new)
        return len(new)

    async def _write_attributes(self, conn: asyncpg.Connection, new: list[Record]) -> None:
        """Attributes of the positions new in this transaction, COPYed straight in.

        A position new to the table has no attributes row yet (both are written in one
        transaction), so a plain COPY suffices; should one exist all the same (rows left
        by hand), the savepoint rolls back and the batch is upserted through staging.
        """
        assert self.attributes is not None
        rows = self.attributes(new)
        if not rows:
            return
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "position_attributes", records=map(_attribute_row, rows)
                )
        except asyncpg.UniqueViolationError:
            await conn.copy_records_to_table("attributes_stage", records=rows)
            await conn.execute(_MOVE_ATTRIBUTES)
