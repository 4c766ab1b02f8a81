"""The Parquet schema of the analytics export and the build of its columns from records.

Pure: records in, Arrow tables out. Columns are built from the records a chunk at a
time (one list per column through an attribute getter, then one ``pa.array`` each), never
row by row through dicts, because the export runs at stream speed. The raw IO map becomes one JSON
text per row: IO ids as keys, integers as JSON numbers (64-bit values exact), bytes as
lowercase hex strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from processor.core.jsonenc import io_json
from processor.core.records import Record

DAY_MS: Final = 86_400_000

SCHEMA: Final = pa.schema(
    [
        pa.field("imei", pa.string(), nullable=False),
        pa.field("device_id", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("received_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("lat", pa.float64(), nullable=False),
        pa.field("lon", pa.float64(), nullable=False),
        pa.field("alt", pa.int32(), nullable=False),
        pa.field("angle", pa.int16(), nullable=False),
        pa.field("sat", pa.int16(), nullable=False),
        pa.field("speed", pa.int32(), nullable=False),
        pa.field("priority", pa.int8(), nullable=False),
        pa.field("event_io", pa.int32(), nullable=False),
        pa.field("codec", pa.int16(), nullable=False),
        pa.field("generation", pa.int16(), nullable=True),
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("io", pa.string(), nullable=False),
    ]
)

# One getter per column, by name: a column list is built with one C-level map per field.
_SCALAR_COLUMNS: Final = tuple(
    (field.name, attrgetter(field.name), field.type) for field in SCHEMA if field.name != "io"
)
_get_io: Final = attrgetter("io")


def records_to_batch(records: Sequence[Record]) -> pa.RecordBatch:
    """One Arrow record batch of ``SCHEMA`` holding ``records`` in order."""
    if not records:
        return _empty_batch()
    arrays: dict[str, pa.Array] = {
        name: pa.array(list(map(get, records)), type=type_) for name, get, type_ in _SCALAR_COLUMNS
    }
    arrays["io"] = pa.array(list(map(io_json, map(_get_io, records))), type=pa.string())
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in SCHEMA], schema=SCHEMA)


def _empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=SCHEMA)


def day_label(day: int) -> str:
    """``YYYY-MM-DD`` of the UTC day number ``day`` (days since 1970-01-01)."""
    return datetime.fromtimestamp(day * DAY_MS / 1000, tz=UTC).strftime("%Y-%m-%d")


def split_by_day(table: pa.Table) -> dict[str, pa.Table]:
    """The rows of ``table`` grouped by the UTC day of ``ts``, keyed ``YYYY-MM-DD``."""
    if table.num_rows == 0:
        return {}
    days = pc.divide(table.column("ts").cast(pa.int64()), DAY_MS)
    low, high = pc.min_max(days).values()
    if low.as_py() == high.as_py():  # the usual case: one live day, no copy
        return {day_label(low.as_py()): table}
    return {
        day_label(day): table.filter(pc.equal(days, day))
        for day in sorted(pc.unique(days).to_pylist())
    }
