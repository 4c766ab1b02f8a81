"""The idempotent batch writer of positions (and their attributes) into PostgreSQL.

A batch is COPYed (binary) into a per-connection temporary staging table and moved with
``INSERT … SELECT … ON CONFLICT DO NOTHING`` in one transaction, so any entry may be
delivered any number of times and the table ends the same (rule 3). With attribute
decoding on, the decoded attributes travel in the same staging rows and a second
statement of the same transaction stores them: nothing comes back to the client. Rows
go in (device_id, ts) order, so batches written at once by concurrent transactions take
their row locks in one order and cannot deadlock on a key they share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    "attributes",
    "mapping_version",
)

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS positions_stage (
    device_id bigint, ts bigint, received_at bigint, lat float8, lon float8, alt integer,
    angle smallint, satellites smallint, speed integer, priority smallint, event_io integer,
    codec smallint, generation smallint, io jsonb, stream_id text, attributes jsonb,
    mapping_version integer
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
ORDER BY device_id, ts
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
ORDER BY device_id, ts
ON CONFLICT DO NOTHING
"""

AttributeRow = tuple[int, int, bytes, int]  # device_id, ts ms, attributes JSON, mapping version
# One attributes row per record, in the records' order.
AttributeFn = Callable[[Sequence[Record]], Sequence[AttributeRow]]


def stage_row(record: Record, attributes: AttributeRow | None = None) -> tuple[Any, ...]:
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
    )


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

        Attributes are decoded for the whole batch and stored with the positions.
        """
        unique = dedupe(records)
        if not unique:
            return 0
        rows = map(stage_row, unique)
        if self.attributes is not None:
            rows = map(stage_row, unique, self.attributes(unique))
        async with self._pool.acquire() as conn:
            if self._partitions is not None:
                await self._partitions.ensure_for(conn, [r.ts for r in unique])
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "positions_stage", records=rows, columns=STAGE_COLUMNS
                )
                status = await conn.execute(_MOVE)
                if self.attributes is not None:
                    await conn.execute(_MOVE_ATTRIBUTES)
        return int(status.rsplit(" ", 1)[1])
