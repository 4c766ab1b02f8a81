"""The Parquet schema of the analytics export and the build of its columns from records.

Pure: records in, Arrow tables out. Columns are built from the records a chunk at a
time (each record's fields as a tuple, transposed into one sequence per column, then one
``pa.array`` each), never row by row through dicts, because the export runs at stream
speed. The raw IO map becomes one JSON text per row, exactly
:func:`processor.core.jsonenc.io_json`: IO ids as keys, integers as JSON numbers (64-bit
values exact), bytes as lowercase hex strings. The texts of a chunk are encoded as one
JSON array and cut apart by Arrow (no Python object per text)."""

from __future__ import annotations

import re
import struct
from array import array
from binascii import a2b_base64, hexlify
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Final

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from msgspec.structs import astuple

from processor.core.records import IoValue, Record

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


def _build_type(type_: pa.DataType) -> pa.DataType:
    # Timestamps are built as their int64 milliseconds and viewed as timestamps (no copy).
    return pa.int64() if pa.types.is_timestamp(type_) else type_


# Fixed-width columns without nulls are packed by ``struct`` (little-endian, as Arrow
# lays them out) straight into the column's data buffer: a third of the time ``pa.array``
# takes per Python number. Values out of a type's range raise either way.
_PACKED: Final = {
    pa.int8(): "b",
    pa.int16(): "h",
    pa.int32(): "i",
    pa.int64(): "q",
    pa.float64(): "d",
}


def _pack_code(field: pa.Field) -> str | None:
    return None if field.nullable else _PACKED.get(_build_type(field.type))


# Each column's place in a record's fields (``msgspec.structs.astuple`` order): the rows
# of a chunk are turned into columns by one C-level transposition, ``zip(*tuples)``.
_FIELD_INDEX: Final = {name: n for n, name in enumerate(Record.__struct_fields__)}
_COLUMNS: Final = tuple(
    (field.name, _FIELD_INDEX[field.name], _build_type(field.type), field.type, _pack_code(field))
    for field in SCHEMA
)
_get_io: Final = attrgetter("io")
_encode: Final = msgspec.json.Encoder().encode
# In an IO map's JSON text, a string value: bytes, base64 as msgspec writes them.
_STRING_VALUE: Final = re.compile(rb':"([^"]*)"')
_CLOSE: Final = pa.scalar(b"}", pa.binary())
_NO_SEPARATOR: Final = pa.scalar(b"", pa.binary())


def records_to_batch(records: Sequence[Record]) -> pa.RecordBatch:
    """One Arrow record batch of ``SCHEMA`` holding ``records`` in order."""
    if not records:
        return _empty_batch()
    count = len(records)
    fields = list(zip(*map(astuple, records), strict=True))
    arrays: list[pa.Array] = []
    for name, index, build_type, type_, code in _COLUMNS:
        if name == "io":
            arrays.append(_io_array(fields[index]))
            continue
        if code is None:
            array_ = pa.array(fields[index], type=build_type)
        else:
            data = pa.py_buffer(struct.pack(f"<{count}{code}", *fields[index]))
            array_ = pa.Array.from_buffers(build_type, count, [None, data])
        arrays.append(array_ if build_type is type_ else array_.view(type_))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def batch_from_buffers(
    rows: int, buffers: Sequence[bytes | None], generation_nulls: int
) -> pa.RecordBatch:
    """One Arrow record batch of ``SCHEMA`` over column buffers laid out by the native
    column builder (``_export_columns.export_columns``), without a copy.

    ``buffers`` holds, in ``SCHEMA`` order, the 32-bit offsets and the data of a string
    column, the validity bitmap (None when no row is null) and the data of
    ``generation``, and the data alone of every other column.
    """
    arrays: list[pa.Array] = []
    at = 0
    for field in SCHEMA:
        build_type = _build_type(field.type)
        if build_type == pa.string():
            offsets, data = buffers[at], buffers[at + 1]
            parts = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
            at += 2
            array_ = pa.Array.from_buffers(build_type, rows, parts)
        elif field.nullable:
            validity, data = buffers[at], buffers[at + 1]
            at += 2
            parts = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(data)]
            array_ = pa.Array.from_buffers(build_type, rows, parts, null_count=generation_nulls)
        else:
            array_ = pa.Array.from_buffers(build_type, rows, [None, pa.py_buffer(buffers[at])])
            at += 1
        arrays.append(array_ if build_type == field.type else array_.view(field.type))
    if at != len(buffers):
        raise ValueError(f"{len(buffers)} column buffers for {at} expected")
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def io_column(records: Sequence[Record]) -> pa.StringArray:
    """The ``io`` column: each record's IO map as :func:`~processor.core.jsonenc.io_json`.

    msgspec writes bytes as base64; a string value can only come from bytes (the keys
    are the other strings), so those values are turned into hex, all of a chunk at once:
    C-level maps over the values, no Python code per value or per record.
    """
    return _io_array(list(map(_get_io, records)))


def _io_array(maps: Sequence[Mapping[int, IoValue]]) -> pa.StringArray:
    # All maps in one JSON array, ``[{…},{…}]`` (an IO text holds no brace or nested
    # object), cut apart by Arrow at each "},": no Python object per text.
    data = _encode(maps)
    if data.count(b'"') != 2 * sum(map(len, maps)):  # not only the keys are strings
        # Every base64 value replaced by its hex, in one pass over the chunk.
        parts = _STRING_VALUE.split(data)  # text, value, text, …, text
        parts[1::2] = map(b':"%s"'.__mod__, map(hexlify, map(a2b_base64, parts[1::2])))
        data = b"".join(parts)
    # The one binary value "{…},{…},{…" (each text but the last "}"), without a copy.
    whole = pa.Array.from_buffers(
        pa.binary(), 1, [None, pa.py_buffer(array("i", (1, len(data) - 2))), pa.py_buffer(data)]
    )
    texts = pc.split_pattern(whole, b"},").flatten()
    closed = pc.binary_join_element_wise(texts, _CLOSE, _NO_SEPARATOR)
    return closed.view(pa.string())  # msgspec writes UTF-8, and hex is ASCII: no check


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
