"""The C encoder of the attribute path writes exactly the bytes of the Python path.

The Python path is the definition: ``decode_attributes`` (the mapping rules), then
msgspec's JSON. The C encoder (``processor/core/_speedups.c``) must give the
same bytes for any mapping and any IO map, and the same COPY data, so that a build with
or without it stores the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.adapters import pgcopy
from processor.adapters.mappings import DECODE_ERRORS, MappingCache, MappingSet
from processor.adapters.reference import read_io_csv
from processor.core import attributes as attrs
from processor.core.attributes import (
    DeviceEntry,
    IoElement,
    ModelMapping,
    decode_attributes,
)
from processor.core.jsonenc import attributes_json
from processor.core.records import IoValue, Record

native = pytest.importorskip("processor.core._speedups", reason="built without the C encoder")

CSV = Path(__file__).resolve().parents[2] / "data" / "io-elements-fmb.csv"


def python_json(io: Mapping[int, IoValue], mapping: ModelMapping) -> bytes:
    return attributes_json(decode_attributes(io, mapping))


def native_json(io: Mapping[int, IoValue], mapping: ModelMapping) -> bytes:
    assert mapping.native is not None
    return native.encode_attributes(io, mapping.native)


names = st.one_of(
    st.sampled_from(["speed", "ignition", "a", "ab", "b", "external_voltage", "x" * 40]),
    st.text(min_size=1, max_size=12),  # quotes, backslashes, controls, non-ASCII
)
multipliers = st.sampled_from(
    [1, 0.1, 0.01, 0.001, 0.0001, 1e-6, 1e-9, 0.25, 0.5, 2, 10, 3, 1.5, 0.3, Decimal("0.05")]
)
offsets = st.sampled_from([0, 0, 0, -40, 1.5, 273.15, 1000])
elements = st.builds(
    IoElement,
    io_id=st.integers(0, 300),
    name=names,
    size=st.sampled_from([1, 2, 4, 8, -1]),
    signed=st.booleans(),
    multiplier=multipliers,
    offset=offsets,
    labels=st.dictionaries(st.integers(-5, 300), names, max_size=4),
    encoding=st.sampled_from(["number", "number", "number", "ascii", "hex"]),
)
values = st.one_of(
    st.integers(0, 255),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2**53, 2**53 + 1, 2**63, 2**64 - 1, 10**15, 10**15 - 1]),
    st.binary(max_size=20),
)
io_maps = st.dictionaries(st.integers(0, 320), values, max_size=30)


@settings(max_examples=400)
@given(st.lists(elements, max_size=12), io_maps)
def test_native_json_is_the_python_json_byte_for_byte(
    items: list[IoElement], io: dict[int, IoValue]
) -> None:
    mapping = ModelMapping.build("M", items)
    if mapping.native is None:  # repeated names: the encoder is not used for this mapping
        return
    assert native_json(io, mapping) == python_json(io, mapping)


@given(st.integers(-(2**62), 2**62), st.sampled_from([10, 100, 1000, 10**4, 10**6, 10**15]))
def test_division_by_a_power_of_ten_is_written_as_repr_would(value: int, divisor: int) -> None:
    mapping = ModelMapping.build("M", [IoElement(1, "v", 8, multiplier=Decimal(1) / divisor)])
    assert native_json({1: value}, mapping) == python_json({1: value}, mapping)


@pytest.mark.parametrize(
    "value", [1e16, 1.5e16, 1e-7, 1.5e-5, 1e-5, 9.99e-6, 0.0001, 12.0, float("inf"), -0.0]
)
def test_floats_are_written_as_msgspec_writes_them(value: float) -> None:
    plan = native.compile({1: (b'"v":', attrs.CALL, lambda raw: value)})
    assert native.encode_attributes({1: 0}, plan) == attributes_json({"v": value})


def test_the_fmb_table_decodes_the_same_either_way() -> None:
    mapping = ModelMapping.build("FMB920", read_io_csv(CSV))
    assert mapping.native is not None
    for io_id, element in mapping.elements.items():
        size = element.size if element.size > 0 else 8
        for raw in (0, 1, 127, 128, 255, 2 ** (size * 8) - 1, 3000, 850):
            io: dict[int, IoValue] = {io_id: raw % 2 ** (size * 8), 9999: raw}
            assert native_json(io, mapping) == python_json(io, mapping), (io_id, raw)
        assert native_json({io_id: b"\x00AB\x7f"}, mapping) == python_json(
            {io_id: b"\x00AB\x7f"}, mapping
        )


def test_keys_come_in_the_io_order() -> None:
    mapping = ModelMapping.build(
        "M", [IoElement(1, "speed"), IoElement(2, "ab"), IoElement(3, "b"), IoElement(4, "aa")]
    )
    text = native_json({3: 7, 1: 5, 77: 9, 2: 6, 4: 8}, mapping)
    assert list(orjson.loads(text)) == ["b", "speed", "77", "ab", "aa"]


def test_plans_the_encoder_cannot_take_are_refused_at_compile_time() -> None:
    with pytest.raises(TypeError):
        native.compile({1: ("not bytes", attrs.IDENTITY, None)})
    with pytest.raises(ValueError, match="kind"):
        native.compile({1: (b'"v":', 9, None)})
    with pytest.raises(TypeError):
        native.encode_attributes({1: 0}, {1: (b'"v":', attrs.IDENTITY, None)})  # not compiled


def test_labels_beyond_the_array_are_looked_up_in_their_dict() -> None:
    mapping = ModelMapping.build(
        "M", [IoElement(1, "code", 4, labels={5: "five", 70_000: "far"}), IoElement(2, "x")]
    )
    for value in (5, 6, 70_000, 70_001, 2**40):
        assert native_json({1: value, 2: 1}, mapping) == python_json({1: value, 2: 1}, mapping)


def test_names_an_unknown_id_could_repeat_keep_the_python_path() -> None:
    assert ModelMapping.build("M", [IoElement(1, "21")]).native is None
    assert ModelMapping.build("M", [IoElement(1, "x"), IoElement(2, "x")]).native is None


def test_a_failing_decoder_raises_through_the_encoder() -> None:
    def broken(raw: IoValue) -> int:
        raise ValueError("broken decoder")

    with pytest.raises(ValueError, match="broken decoder"):
        native.encode_attributes({1: 0}, native.compile({1: (b'"v":', attrs.CALL, broken)}))


def records(count: int) -> list[Record]:
    out = []
    for i in range(count):
        io: dict[int, IoValue] = {239: i % 2, 66: 12_000 + i, 16: i * 1000, 9999: i, 256: b"VIN"}
        out.append(
            Record(
                codec=142, ts=1_717_243_200_000 + i * 1000, received_at=1_717_243_200_500,
                priority=0, lat=45.0, lon=15.0, alt=100, angle=0, sat=9, speed=50,
                event_io=0, io=io, device_id=356307040000000 + i % 3,
            )
        )  # fmt: skip
    return out


def entries_for(mapping: ModelMapping, encoder: Any) -> Callable[[int], DeviceEntry]:
    return lambda device_id: (encoder, mapping.version, device_id % 3 != 0)


def test_rows_and_copy_data_are_the_same_with_either_encoder() -> None:
    mapping = ModelMapping.build("FMB920", read_io_csv(CSV))
    batch = records(50)
    python = entries_for(mapping, lambda io: python_json(io, mapping))
    expected_rows, expected_unknown = attrs.attribute_rows_py(batch, {}, python)
    expected_data = pgcopy.attribute_copy_py(expected_rows)

    rows, unknown = native.attribute_rows(batch, {}, entries_for(mapping, mapping.native))
    assert (rows, unknown) == (expected_rows, expected_unknown)
    assert unknown == sum(1 for r in batch if r.device_id % 3 == 0) > 0
    data, unknown = native.attribute_copy_records(batch, {}, entries_for(mapping, mapping.native))
    assert (data, unknown) == (expected_data, expected_unknown)
    assert native.attribute_copy(rows) == expected_data
    # A Python encoder in an entry (a mapping the C encoder does not take) is called.
    data, _ = native.attribute_copy_records(batch, {}, python)
    assert data == expected_data


def test_device_entries_are_resolved_once_and_kept() -> None:
    mapping = ModelMapping.build("FMB920", read_io_csv(CSV))
    asked: list[int] = []

    def resolve(device_id: int) -> DeviceEntry:
        asked.append(device_id)
        return mapping.encoder(), mapping.version, True

    entries: dict[int, DeviceEntry] = {}
    native.attribute_copy_records(records(30), entries, resolve)
    native.attribute_rows(records(30), entries, resolve)
    assert sorted(asked) == sorted(entries) == [356307040000000 + i for i in range(3)]


def test_the_python_fallback_gives_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = ModelMapping.build("FMB920", read_io_csv(CSV))
    batch = records(20)
    built = pgcopy.attribute_copy_records(batch, {}, entries_for(mapping, mapping.encoder()))
    monkeypatch.setattr(attrs, "_native", None)  # as a package built without C ...
    monkeypatch.setattr(pgcopy, "_native", None)
    unbuilt = ModelMapping.build("FMB920", read_io_csv(CSV))  # ... compiles no plan
    assert unbuilt.native is None
    assert attrs.encode_attributes(batch[0].io, unbuilt) == native_json(batch[0].io, mapping)
    fallback = pgcopy.attribute_copy_records(batch, {}, entries_for(unbuilt, unbuilt.encoder()))
    assert fallback == built


def test_a_decoder_failing_on_a_record_keeps_its_raw_io_and_the_rest_decoded() -> None:
    """Attributes are derived: a mapping that fails on one record costs neither that
    position nor the other records' decoding (with either encoder)."""

    def fussy(raw: IoValue) -> int:
        if raw == 13:
            raise ValueError("unlucky")
        return int(raw) * 2  # type: ignore[arg-type]

    plans = {1: ("doubled", attrs.CALL, fussy)}
    mapping = ModelMapping("M", {}, 77, plans, attrs.native_plan(plans))
    cache = MappingCache("M", 60.0)
    cache.current = MappingSet({"M": mapping}, {}, "f")
    batch = records(3)
    for record, value in zip(batch, (1, 13, 2), strict=True):
        record.io = {1: value, 5: 6}
    raw_version = ModelMapping.build("M", ()).version
    expected = [
        (batch[0].device_id, batch[0].ts, b'{"doubled":2,"5":6}', 77),
        (batch[1].device_id, batch[1].ts, b'{"1":13,"5":6}', raw_version),
        (batch[2].device_id, batch[2].ts, b'{"doubled":4,"5":6}', 77),
    ]
    errors = DECODE_ERRORS._value.get()
    assert cache.rows(batch) == expected
    assert cache.copy_data(batch) == pgcopy.attribute_copy_py(expected)
    assert DECODE_ERRORS._value.get() == errors + 2
