"""Decoded attributes: the IO mapping table turns raw IO into named, typed values."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.adapters.reference import read_io_csv
from processor.core.attributes import (
    IoElement,
    ModelMapping,
    decode_attributes,
    parse_values,
)
from processor.core.jsonenc import attributes_json

CSV = Path(__file__).resolve().parents[2] / "data" / "io-elements-fmb.csv"


@pytest.fixture(scope="module")
def fmb() -> ModelMapping:
    return ModelMapping.build("FMB920", read_io_csv(CSV))


def u(value: int, size: int) -> int:
    """The unsigned wire value of a signed number (what ingestion sends)."""
    return value & ((1 << (size * 8)) - 1)


@pytest.mark.parametrize(
    ("io_id", "wire", "expected"),
    [
        (17, u(-1, 2), -1),
        (17, u(-32768, 2), -32768),
        (18, 32767, 32767),
        (19, u(-981, 2), -981),
        (19, 0, 0),
    ],
)
def test_signed_axis_values_are_twos_complement_of_two_bytes(
    fmb: ModelMapping, io_id: int, wire: int, expected: int
) -> None:
    name = {17: "axis_x", 18: "axis_y", 19: "axis_z"}[io_id]
    assert decode_attributes({io_id: wire}, fmb) == {name: expected}


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (235, 23.5),
        (u(-105, 4), -10.5),
        (u(-550, 4), -55.0),
        (0, 0.0),
        (850, "sensor_not_ready"),
        (2000, "value_out_of_range"),
        (3000, "not_connected"),
        (4000, "id_failed"),
        (5000, "same_id"),
    ],
)
def test_dallas_temperature_scales_by_a_tenth_and_names_error_codes(
    fmb: ModelMapping, wire: int, expected: object
) -> None:
    decoded = decode_attributes({72: wire, 75: wire}, fmb)
    assert decoded == {"dallas_temperature_1": expected, "dallas_temperature_4": expected}
    assert type(decoded["dallas_temperature_1"]) is type(expected)


@pytest.mark.parametrize("iccid", [8938500000000012345, 2**64 - 1, 2**63 + 1, 0])
def test_64_bit_iccid_stays_an_exact_integer_through_json(fmb: ModelMapping, iccid: int) -> None:
    decoded = decode_attributes({11: iccid, 14: iccid}, fmb)
    assert decoded == {"iccid1": iccid, "iccid2": iccid}
    assert orjson.loads(attributes_json(decoded))["iccid1"] == iccid


def test_integer_scaled_beyond_64_bits_is_kept_exact_as_text() -> None:
    mapping = ModelMapping.build("X", [IoElement(900, "energy_mwh", size=8, multiplier=1000)])
    decoded = decode_attributes({900: 2**64 - 1, 901: 7}, mapping)
    assert decoded == {"energy_mwh": str((2**64 - 1) * 1000), "901": 7}
    assert orjson.loads(attributes_json(decoded)) == decoded
    assert decode_attributes({900: 5}, mapping) == {"energy_mwh": 5000}


def test_vin_variable_bytes_decode_as_ascii(fmb: ModelMapping) -> None:
    assert decode_attributes({256: b"WV1ZZZ2EZ86015388"}, fmb) == {"vin": "WV1ZZZ2EZ86015388"}


def test_ascii_strips_nul_padding_and_shows_non_ascii_bytes(fmb: ModelMapping) -> None:
    assert decode_attributes({256: b"VIN\xff12\x00\x00"}, fmb) == {"vin": "VIN\ufffd12"}


def test_binary_elements_are_lowercase_hex(fmb: ModelMapping) -> None:
    assert decode_attributes({385: b"\x01\xab\xff"}, fmb) == {"beacon": "01abff"}


def test_unknown_io_ids_are_kept_raw_under_their_id(fmb: ModelMapping) -> None:
    decoded = decode_attributes({9999: 2**64 - 1, 9998: b"\x00\x10", 239: 1}, fmb)
    assert decoded == {"9999": 2**64 - 1, "9998": "0010", "ignition": "on"}


def test_enum_labels_and_plain_values(fmb: ModelMapping) -> None:
    io = {239: 0, 240: 1, 318: 2, 247: 1, 252: 1, 113: 87, 16: 22949000, 21: 4}
    assert decode_attributes(io, fmb) == {
        "ignition": "off",
        "movement": "yes",
        "gnss_jamming": "critical",
        "crash_detection": "crash",
        "unplug": "unplugged",
        "battery_level": 87,
        "total_odometer": 22949000,
        "gsm_signal": 4,
    }


def test_an_unlabelled_enum_value_stays_a_number(fmb: ModelMapping) -> None:
    assert decode_attributes({247: 0, 239: 7}, fmb) == {"crash_detection": 0, "ignition": 7}


@pytest.mark.parametrize(
    ("io_id", "wire", "name", "expected"),
    [
        (66, 12850, "external_voltage", 12.85),
        (67, 4012, "battery_voltage", 4.012),
        (181, 13, "gnss_pdop", 1.3),
        (13, 745, "fuel_rate_gps", 7.45),
        (254, 35, "green_driving_value", 0.35),
    ],
)
def test_multiplier_gives_the_decimal_value_without_float_noise(
    fmb: ModelMapping, io_id: int, wire: int, name: str, expected: float
) -> None:
    assert decode_attributes({io_id: wire}, fmb) == {name: expected}


def test_offset_applies_after_the_multiplier() -> None:
    mapping = ModelMapping.build(
        "X", [IoElement(1, "temp", 1, signed=True, multiplier=0.5, offset=-40)]
    )
    assert decode_attributes({1: 100}, mapping) == {"temp": 10.0}
    assert decode_attributes({1: u(-2, 1)}, mapping) == {"temp": -41.0}


def test_integral_multiplier_and_offset_keep_integers_exact() -> None:
    mapping = ModelMapping.build("X", [IoElement(1, "big", 8, multiplier=10, offset=1)])
    assert decode_attributes({1: 2**59}, mapping) == {"big": 2**59 * 10 + 1}
    # Beyond 64 bits the exact value is kept as decimal text (JSON readers would round it).
    assert decode_attributes({1: 2**63}, mapping) == {"big": str(2**63 * 10 + 1)}


def test_numeric_element_receiving_bytes_is_shown_as_hex(fmb: ModelMapping) -> None:
    assert decode_attributes({66: b"\x32\x32"}, fmb) == {"external_voltage": "3232"}


def test_a_value_wider_than_its_mapping_says_keeps_all_its_bytes() -> None:
    # `bytes` = 1 in the mapping, but the device sent two bytes' worth: shown, not raised.
    text = ModelMapping.build("M", [IoElement(1, "code", 1, encoding="ascii")])
    binary = ModelMapping.build("M", [IoElement(2, "raw", 1, encoding="hex")])
    assert decode_attributes({1: 0x4142}, text) == {"code": "AB"}
    assert decode_attributes({2: 0x1FF}, binary) == {"raw": "01ff"}


def test_hex_element_receiving_an_integer_uses_its_byte_size() -> None:
    mapping = ModelMapping.build("X", [IoElement(78, "ibutton", 8, encoding="hex")])
    assert decode_attributes({78: 0x0100000012345678}, mapping) == {"ibutton": "0100000012345678"}


def test_version_identifies_content_not_identity() -> None:
    one = ModelMapping.build("A", [IoElement(1, "a"), IoElement(2, "b", signed=True)])
    same = ModelMapping.build("B", [IoElement(2, "b", signed=True), IoElement(1, "a")])
    other = ModelMapping.build("A", [IoElement(1, "a"), IoElement(2, "b", signed=False)])
    assert one.version == same.version != other.version
    assert 0 < one.version < 2**31


@pytest.mark.parametrize(
    ("values", "labels", "encoding"),
    [
        (None, {}, "number"),
        ({"0": "off", "1": "on"}, {0: "off", 1: "on"}, "number"),
        ("ascii", {}, "ascii"),
        ("hex", {}, "hex"),
    ],
)
def test_values_column_forms(values: object, labels: object, encoding: str) -> None:
    assert parse_values(values) == (labels, encoding)


@pytest.mark.parametrize("values", ["utf8", {"x": "y"}, [1, 2], 5])
def test_values_column_junk_is_rejected(values: object) -> None:
    with pytest.raises(ValueError, match=r"values|integers"):
        parse_values(values)


@given(
    size=st.sampled_from([1, 2, 4, 8]),
    data=st.data(),
)
def test_signed_decoding_round_trips_every_value_of_its_size(
    size: int, data: st.DataObject
) -> None:
    bits = size * 8
    number = data.draw(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1))
    mapping = ModelMapping.build("X", [IoElement(1, "v", size, signed=True)])
    assert decode_attributes({1: u(number, size)}, mapping) == {"v": number}


@given(st.dictionaries(st.integers(0, 65535), st.integers(0, 2**64 - 1) | st.binary(max_size=32)))
def test_decoding_never_raises_and_keeps_every_element(io: dict[int, int | bytes]) -> None:
    mapping = ModelMapping.build("FMB920", read_io_csv(CSV))
    decoded = decode_attributes(io, mapping)
    assert len(decoded) == len(io)
    orjson.dumps(decoded)
