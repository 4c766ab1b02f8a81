"""PostgreSQL binary COPY data for positions and attributes, built in one pass per batch.

The writer's rows have a fixed shape, so each row is a few ``struct`` packs (about what
asyncpg's record encoder costs) and ``timestamptz`` values go as PostgreSQL stores them
(microseconds since 2000-01-01) from the records' milliseconds, with no ``datetime``
object per value, which is what lets rows be COPYed straight into the tables. The
format is PostgreSQL's (``COPY … FROM STDIN (FORMAT binary)``): a signature, then per row
the field count and each field as a 32-bit length (-1 for NULL) and its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from processor.core.attributes import DeviceEntry
from processor.core.attributes import attribute_rows as decoded_rows
from processor.core.jsonenc import io_json
from processor.core.records import Record

try:
    from processor.core import _speedups as _native
except ImportError:  # built without a C compiler
    _native = None  # type: ignore[assignment]

HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, extension length
TRAILER: Final = b"\xff\xff"

# PostgreSQL timestamps count microseconds from 2000-01-01T00:00:00Z.
_PG_EPOCH_MS: Final = 946_684_800_000

# The columns every positions row has, in this order.
POSITION_COLUMNS: Final = (
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
ATTRIBUTE_COLUMNS: Final = ("device_id", "ts", "attributes", "mapping_version")

# Field count, then (length, value) for device_id … codec: fixed widths.
_FIXED: Final = struct.Struct("!h iq iq iq id id ii ih ih ii ih ii ih")
_GENERATION: Final = struct.Struct("!ih")
_LENGTH: Final = struct.Struct("!i")
_NULL: Final = _LENGTH.pack(-1)
_JSONB: Final = b"\x01"  # jsonb binary format version
_ATTRIBUTES: Final = struct.Struct("!h iq iq")
_VERSION: Final = struct.Struct("!ii")


def pg_timestamp(ms: int) -> int:
    """A Unix time in milliseconds as PostgreSQL's microseconds since 2000-01-01."""
    return (ms - _PG_EPOCH_MS) * 1000


def position_rows(records: Iterable[Record]) -> bytes:
    """Binary COPY data of ``positions`` rows (:data:`POSITION_COLUMNS`) for ``records``."""
    fields = len(POSITION_COLUMNS)
    fixed, length, generation = _FIXED.pack, _LENGTH.pack, _GENERATION.pack
    out = [HEADER]
    append = out.append
    for record in records:
        append(
            fixed(
                fields,
                8,
                record.device_id,
                8,
                (record.ts - _PG_EPOCH_MS) * 1000,
                8,
                (record.received_at - _PG_EPOCH_MS) * 1000,
                8,
                record.lat,
                8,
                record.lon,
                4,
                record.alt,
                2,
                record.angle,
                2,
                record.sat,
                4,
                record.speed,
                2,
                record.priority,
                4,
                record.event_io,
                2,
                record.codec,
            )
        )
        gen = record.generation
        append(_NULL if gen is None else generation(2, gen))
        io = io_json(record.io)
        append(length(len(io) + 1))
        append(_JSONB)
        append(io)
        sid = record.stream_id.encode()
        append(length(len(sid)))
        append(sid)
    append(TRAILER)
    return b"".join(out)


def attribute_copy_records(
    records: Sequence[Record],
    entries: dict[int, DeviceEntry],
    resolve: Callable[[int], DeviceEntry],
) -> tuple[bytes, int]:
    """Binary COPY data of the records' ``position_attributes`` rows, decoded with their
    devices' entries (see :func:`processor.core.attributes.attribute_rows`), and how many
    records are of devices not in ``devices``."""
    if _native is not None:
        return _native.attribute_copy_records(records, entries, resolve)
    rows, unknown = decoded_rows(records, entries, resolve)
    return attribute_copy_py(rows), unknown


def attribute_rows(rows: Sequence[tuple[int, int, bytes, int]]) -> bytes:
    """Binary COPY data of ``position_attributes`` rows (:data:`ATTRIBUTE_COLUMNS`) from
    ``(device_id, ts ms, attributes JSON, mapping version)``."""
    if _native is not None:
        return _native.attribute_copy(rows)
    return attribute_copy_py(rows)


def attribute_copy_py(rows: Iterable[tuple[int, int, bytes, int]]) -> bytes:
    """:func:`attribute_rows` in Python (what the C encoder, when built, writes too)."""
    head, length, version = _ATTRIBUTES.pack, _LENGTH.pack, _VERSION.pack
    out = [HEADER]
    append = out.append
    for device_id, ts, text, mapping_version in rows:
        append(head(4, 8, device_id, 8, (ts - _PG_EPOCH_MS) * 1000))
        append(length(len(text)))  # json's binary format is its text
        append(text)
        append(version(4, mapping_version))
    append(TRAILER)
    return b"".join(out)
