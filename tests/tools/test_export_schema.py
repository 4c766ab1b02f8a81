"""Arrow columns built from records: types, exact IO JSON, day split (pure, no services)."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.contract import decode_entry
from processor.core.jsonenc import io_json
from processor.core.records import Record
from processor.tools.export_files import DICTIONARY_COLUMNS, STATISTICS_COLUMNS
from processor.tools.export_schema import (
    DAY_MS,
    SCHEMA,
    day_label,
    io_column,
    records_to_batch,
    split_by_day,
)

from ..unit.test_contract import records as contract_records
from .test_export_helpers import BASE_TS, entry


def record(n: int, ts: int = BASE_TS) -> Record:
    decoded = decode_entry(f"{ts}-{n}", entry(n % 7, ts, n))
    assert isinstance(decoded, Record)
    return decoded


@pytest.mark.parametrize(
    ("io", "text"),
    [
        ({}, "{}"),
        ({239: 1, 66: 12_850}, '{"239":1,"66":12850}'),
        ({78: 2**64 - 1}, '{"78":18446744073709551615}'),
        ({78: 2**53 + 1}, '{"78":9007199254740993}'),
        ({256: b"WVW\x00\xff"}, '{"256":"57565700ff"}'),
        ({1: 5, 256: b"", 257: b"\x01"}, '{"1":5,"256":"","257":"01"}'),
    ],
)
def test_io_json_keeps_integers_exact_and_bytes_as_hex(
    io: dict[int, int | bytes], text: str
) -> None:
    assert io_json(io).decode() == text


@given(st.dictionaries(st.integers(0, 65_535), st.integers(0, 2**64 - 1), max_size=20))
def test_io_json_round_trips_any_unsigned_64_bit_map(io: dict[int, int]) -> None:
    assert {int(k): v for k, v in orjson.loads(io_json(io)).items()} == io


@given(
    st.dictionaries(
        st.integers(0, 65_535), st.integers(0, 2**64 - 1) | st.binary(max_size=40), max_size=20
    )
)
def test_io_json_writes_bytes_as_hex_among_numbers(io: dict[int, int | bytes]) -> None:
    expected = {str(k): v.hex() if isinstance(v, bytes) else v for k, v in io.items()}
    assert orjson.loads(io_json(io)) == expected


@given(
    st.lists(
        st.dictionaries(
            st.integers(0, 65_535),
            st.integers(0, 2**64 - 1) | st.binary(max_size=40),
            max_size=20,
        ),
        min_size=1,
        max_size=30,
    )
)
def test_io_column_holds_exactly_the_io_json_of_each_record(
    maps: list[dict[int, int | bytes]],
) -> None:
    records = [Record(8, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, io) for io in maps]

    column = io_column(records)

    assert column.type == pa.string()
    column.validate(full=True)
    assert column.to_pylist() == [io_json(io).decode() for io in maps]


def test_batch_columns_match_the_record_fields_by_name() -> None:
    records = [record(n) for n in range(12)]

    table = pa.Table.from_batches([records_to_batch(records)])

    assert table.schema == SCHEMA
    for name in ("imei", "device_id", "lat", "lon", "alt", "angle", "sat", "speed"):
        assert table.column(name).to_pylist() == [getattr(r, name) for r in records], name
    assert table.column("generation").to_pylist() == [r.generation for r in records]
    assert table.column("stream_id").to_pylist() == [r.stream_id for r in records]
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    assert ts == [r.ts for r in records]


@settings(deadline=None)
@given(st.lists(contract_records, min_size=1, max_size=20))
def test_every_column_holds_the_record_fields_at_their_range_limits(
    records: list[Record],
) -> None:
    batch = records_to_batch(records)

    batch.validate(full=True)
    assert batch.schema == SCHEMA
    for field in SCHEMA:
        column = batch.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.int64())
        if field.name == "io":
            assert column.to_pylist() == [io_json(r.io).decode() for r in records]
        else:
            assert column.to_pylist() == [getattr(r, field.name) for r in records], field.name


def test_an_empty_batch_has_the_schema() -> None:
    assert records_to_batch([]).schema == SCHEMA


def test_rows_are_split_by_their_utc_day() -> None:
    midnight = BASE_TS - BASE_TS % DAY_MS + DAY_MS
    records = [record(1, midnight - 1), record(2, midnight), record(3, midnight - 2)]

    days = split_by_day(pa.Table.from_batches([records_to_batch(records)]))

    assert {day: t.num_rows for day, t in days.items()} == {"2024-06-01": 2, "2024-06-02": 1}


def test_day_labels_cover_bad_clocks() -> None:
    assert day_label(0) == "1970-01-01"
    assert day_label(12_418) == "2004-01-01"
    assert day_label(2_932_896) == "9999-12-31"


def test_parquet_write_options_name_only_schema_columns() -> None:
    names = set(SCHEMA.names)

    assert set(DICTIONARY_COLUMNS) <= names
    assert set(STATISTICS_COLUMNS) == names - {"io"}
