"""Stream contract v1 decoder: every malformed entry has its reason, nothing ever raises."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.contract import (
    BAD_SENTINEL,
    BAD_TYPE,
    INVALID_JSON,
    MISSING_FIELD,
    OUT_OF_RANGE,
    TOO_LARGE,
    UNEXPECTED_FIELD,
    UNSUPPORTED_VERSION,
    decode_entry,
)
from processor.core.records import MAX_TS_MS, Record, Rejection

IMEI = "356307042441013"
STREAM_ID = "1717243201234-0"
MAX_U64 = 2**64 - 1

BASE: dict[str, Any] = {
    "codec": 142,
    "ts": 1717243200000,
    "received_at": 1717243201234,
    "priority": 0,
    "lat": 45.8150108,
    "lon": 15.9819189,
    "alt": 123,
    "angle": 270,
    "sat": 11,
    "speed": 87,
    "event_io": 0,
    "generation": None,
    "io": {
        "239": 1,
        "66": 12850,
        "16": {"$bigint": "22949000"},
        "78": {"$bigint": "72069690697717651"},
        "256": {"$bytes": "V1YxWlpaMkVaODYwMTUzODg="},
    },
}
REQUIRED = [key for key in BASE if key != "generation"]


def dumps(value: Any) -> bytes:
    """Compact JSON as ingestion writes it (stdlib: integers of any size, unlike orjson)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def entry(payload: bytes | str, **fields: bytes) -> dict[bytes, bytes]:
    """A redis-py shaped entry around ``payload``; keyword fields override or add."""
    raw = payload.encode() if isinstance(payload, str) else payload
    out = {b"v": b"1", b"imei": IMEI.encode(), b"payload": raw}
    out.update({k.encode(): v for k, v in fields.items()})
    return out


def with_keys(**changes: Any) -> dict[bytes, bytes]:
    """The valid payload with some keys replaced (or added)."""
    return entry(dumps({**BASE, **changes}))


def without(key: str) -> dict[bytes, bytes]:
    return entry(dumps({k: v for k, v in BASE.items() if k != key}))


def with_io(value: Any) -> dict[bytes, bytes]:
    """The valid payload with IO element 78 set to ``value``."""
    return with_keys(io={**BASE["io"], "78": value})


def replace(old: bytes, new: bytes) -> dict[bytes, bytes]:
    """The valid payload's JSON text with one literal replaced (for non-JSON values)."""
    raw = dumps(BASE)
    assert old in raw
    return entry(raw.replace(old, new, 1))


def drop(name: bytes) -> dict[bytes, bytes]:
    fields = entry(dumps(BASE))
    del fields[name]
    return fields


MALFORMED: list[tuple[str, Any, str]] = [
    # Not JSON at all, or not JSON as RFC 8259 knows it.
    ("not json", entry(b"{not json"), INVALID_JSON),
    ("empty payload", entry(b""), INVALID_JSON),
    ("truncated", entry(dumps(BASE)[:-3]), INVALID_JSON),
    ("trailing garbage", entry(dumps(BASE) + b" x"), INVALID_JSON),
    ("NaN literal", replace(b"45.8150108", b"NaN"), INVALID_JSON),
    ("Infinity literal", replace(b"45.8150108", b"Infinity"), INVALID_JSON),
    ("-Infinity literal", replace(b"15.9819189", b"-Infinity"), INVALID_JSON),
    ("non-UTF-8 bytes", replace(b'"codec"', b'"c\xffdec"'), INVALID_JSON),
    ("lone surrogate in str", {"v": "1", "imei": IMEI, "payload": "{\udcff}"}, INVALID_JSON),
    # Well-formed JSON of the wrong shape.
    ("payload is an array", entry(b"[]"), BAD_TYPE),
    ("payload is a string", entry(b'"x"'), BAD_TYPE),
    ("payload is null", entry(b"null"), BAD_TYPE),
    ("ts as string", with_keys(ts="1717243200000"), BAD_TYPE),
    ("ts as boolean", with_keys(ts=True), BAD_TYPE),
    ("sat as float", with_keys(sat=11.0), BAD_TYPE),
    ("codec as float", with_keys(codec=142.5), BAD_TYPE),
    ("lat as string", with_keys(lat="45.8"), BAD_TYPE),
    ("lat as nested array", with_keys(lat=[[45.8]]), BAD_TYPE),
    ("priority null", with_keys(priority=None), BAD_TYPE),
    ("generation as string", with_keys(generation="1"), BAD_TYPE),
    ("io as array", with_keys(io=[1, 2]), BAD_TYPE),
    ("io key not a number", with_keys(io={"abc": 1}), BAD_TYPE),
    ("io value boolean", with_io(True), BAD_TYPE),
    ("io value float", with_io(1.5), BAD_TYPE),
    ("io value null", with_io(None), BAD_TYPE),
    ("io value string", with_io("5"), BAD_TYPE),
    ("io value nested array", with_io([[1]]), BAD_TYPE),
    # Out of range.
    ("lat above 90", with_keys(lat=90.000001), OUT_OF_RANGE),
    ("lat below -90", with_keys(lat=-91), OUT_OF_RANGE),
    ("lon above 180", with_keys(lon=180.5), OUT_OF_RANGE),
    ("lon below -180", with_keys(lon=-180.0001), OUT_OF_RANGE),
    ("lat 1e999", replace(b"45.8150108", b"1e999"), OUT_OF_RANGE),
    ("ts 1e999", replace(b"1717243200000", b"1e999"), OUT_OF_RANGE),
    ("angle 360", with_keys(angle=360), OUT_OF_RANGE),
    ("angle negative", with_keys(angle=-1), OUT_OF_RANGE),
    ("sat 256", with_keys(sat=256), OUT_OF_RANGE),
    ("sat negative", with_keys(sat=-1), OUT_OF_RANGE),
    ("priority 3", with_keys(priority=3), OUT_OF_RANGE),
    ("ts negative", with_keys(ts=-1), OUT_OF_RANGE),
    ("ts after year 9999", with_keys(ts=MAX_TS_MS + 1), OUT_OF_RANGE),
    ("received_at negative", with_keys(received_at=-5), OUT_OF_RANGE),
    ("alt beyond int16", with_keys(alt=40_000), OUT_OF_RANGE),
    ("speed beyond uint16", with_keys(speed=70_000), OUT_OF_RANGE),
    ("event_io negative", with_keys(event_io=-1), OUT_OF_RANGE),
    ("generation 256", with_keys(generation=256), OUT_OF_RANGE),
    ("unknown codec", with_keys(codec=9), OUT_OF_RANGE),
    ("io id beyond uint16", with_keys(io={"70000": 1}), OUT_OF_RANGE),
    ("io value negative", with_io(-1), OUT_OF_RANGE),
    ("io plain int beyond 32 bits", with_io(2**32), OUT_OF_RANGE),
    ("$bigint above 2^64-1", with_io({"$bigint": str(2**64)}), OUT_OF_RANGE),
    # Malformed sentinels.
    ("sentinel with two keys", with_io({"$bigint": "1", "$bytes": "AA=="}), BAD_SENTINEL),
    ("sentinel unknown key", with_io({"$int": "1"}), BAD_SENTINEL),
    ("sentinel plus other key", with_io({"$bigint": "1", "x": 1}), BAD_SENTINEL),
    ("empty object", with_io({}), BAD_SENTINEL),
    ("sentinel value null", with_io({"$bigint": None}), BAD_SENTINEL),
    ("$bigint hexadecimal", with_io({"$bigint": "0x10"}), BAD_SENTINEL),
    ("$bigint negative", with_io({"$bigint": "-1"}), BAD_SENTINEL),
    ("$bigint empty", with_io({"$bigint": ""}), BAD_SENTINEL),
    ("$bigint with space", with_io({"$bigint": " 1"}), BAD_SENTINEL),
    ("$bigint decimal point", with_io({"$bigint": "1.0"}), BAD_SENTINEL),
    ("$bigint arabic digits", with_io({"$bigint": "١٢"}), BAD_SENTINEL),
    ("$bigint 21 digits", with_io({"$bigint": "0" * 21}), BAD_SENTINEL),
    ("$bigint as number", with_io({"$bigint": 5}), BAD_SENTINEL),
    ("$bytes not base64", with_io({"$bytes": "!!!!"}), BAD_SENTINEL),
    ("$bytes without padding", with_io({"$bytes": "AA"}), BAD_SENTINEL),
    ("$bytes url-safe alphabet", with_io({"$bytes": "-_-_"}), BAD_SENTINEL),
    ("$bytes as list", with_io({"$bytes": [1]}), BAD_SENTINEL),
    ("escaped empty sentinel", replace(b'{"$bigint":"72069690697717651"}', b"{ }"), BAD_SENTINEL),
    # Stream fields.
    ("version 2", entry(dumps(BASE), v=b"2"), UNSUPPORTED_VERSION),
    ("version empty", entry(dumps(BASE), v=b""), UNSUPPORTED_VERSION),
    ("version 1.0", entry(dumps(BASE), v=b"1.0"), UNSUPPORTED_VERSION),
    ("missing v", drop(b"v"), MISSING_FIELD),
    ("missing imei", drop(b"imei"), MISSING_FIELD),
    ("missing payload", drop(b"payload"), MISSING_FIELD),
    ("no fields at all", {}, MISSING_FIELD),
    ("imei 14 digits", entry(dumps(BASE), imei=IMEI[:-1].encode()), BAD_TYPE),
    ("imei 16 digits", entry(dumps(BASE), imei=IMEI.encode() + b"0"), BAD_TYPE),
    ("imei with letters", entry(dumps(BASE), imei=b"35630704244101A"), BAD_TYPE),
    ("imei unicode digits", {"v": "1", "imei": "٣" * 15, "payload": "{}"}, BAD_TYPE),
    ("unexpected stream field", entry(dumps(BASE), extra=b"1"), UNEXPECTED_FIELD),
    ("unexpected payload key", with_keys(extra=1), UNEXPECTED_FIELD),
    ("payload names the imei", with_keys(**{"@@imei": IMEI}), UNEXPECTED_FIELD),
    ("payload names device_id", with_keys(**{"@@device_id": 5}), UNEXPECTED_FIELD),
    ("field value not text", {b"v": 1, b"imei": IMEI.encode(), b"payload": b"{}"}, BAD_TYPE),
    ("fields not a mapping", None, BAD_TYPE),
    ("fields a list", [(b"v", b"1")], BAD_TYPE),
    # Size limits.
    ("oversized entry", entry(b" " * 65_536 + dumps(BASE)), TOO_LARGE),
    ("oversized odd-shaped entry", {"v": "1", "imei": IMEI, "payload": "x" * 70_000}, TOO_LARGE),
    ("too many IO elements", with_keys(io={str(i): 1 for i in range(513)}), TOO_LARGE),
]
# Each required payload key missing in turn.
MALFORMED += [(f"missing {key}", without(key), MISSING_FIELD) for key in REQUIRED]


@pytest.mark.parametrize(
    ("fields", "reason"), [(f, r) for _, f, r in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed_entry_is_rejected_with_its_reason(fields: Any, reason: str) -> None:
    result = decode_entry(STREAM_ID, fields)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail
    assert result.detail


def test_valid_entry_decodes_with_sentinels_replaced() -> None:
    record = decode_entry(STREAM_ID, entry(dumps(BASE)))
    assert isinstance(record, Record)
    assert record.io == {
        239: 1,
        66: 12850,
        16: 22949000,
        78: 72069690697717651,
        256: b"WV1ZZZ2EZ86015388",
    }
    assert (record.stream_id, record.imei, record.device_id) == (STREAM_ID, IMEI, int(IMEI))
    assert record.lat == 45.8150108
    assert record.generation is None


@pytest.mark.parametrize(
    "fields",
    [
        {b"v": b"1", b"imei": IMEI.encode(), b"payload": dumps(BASE)},
        {"v": "1", "imei": IMEI, "payload": dumps(BASE).decode()},
        {"v": b"1", b"imei": IMEI, b"payload": dumps(BASE)},
    ],
    ids=["bytes-keyed", "str-keyed", "mixed"],
)
def test_str_and_bytes_keyed_fields_decode_alike(fields: Any) -> None:
    assert decode_entry(STREAM_ID, fields) == decode_entry(STREAM_ID, entry(dumps(BASE)))


def test_escaped_sentinel_key_is_still_a_sentinel() -> None:
    record = decode_entry(STREAM_ID, replace(b'"$bigint":"7206', b'"\\u0024bigint":"7206'))
    assert isinstance(record, Record)
    assert record.io[78] == 72069690697717651


@pytest.mark.parametrize(
    ("sentinel", "value"),
    [
        ({"$bigint": str(MAX_U64)}, MAX_U64),
        ({"$bigint": "0"}, 0),
        ({"$bigint": "00000000000000000042"}, 42),
        ({"$bigint": str(2**53 + 1)}, 2**53 + 1),
        ({"$bytes": ""}, b""),
        ({"$bytes": "AAEC/w=="}, b"\x00\x01\x02\xff"),
    ],
)
def test_sentinel_edge_values_decode_exactly(sentinel: dict[str, str], value: object) -> None:
    record = decode_entry(STREAM_ID, with_io(sentinel))
    assert isinstance(record, Record)
    assert record.io[78] == value


def test_limits_are_configurable() -> None:
    fields = entry(dumps(BASE))
    small = decode_entry(STREAM_ID, fields, max_entry_bytes=100)
    few = decode_entry(STREAM_ID, fields, max_io_elements=4)
    assert isinstance(small, Rejection)
    assert small.reason == TOO_LARGE
    assert isinstance(few, Rejection)
    assert few.reason == TOO_LARGE


def test_no_fix_and_southern_hemisphere_records_are_valid() -> None:
    record = decode_entry(STREAM_ID, with_keys(lat=-33.9, lon=-70.6, alt=-12, sat=0, ts=0))
    assert isinstance(record, Record)
    assert (record.lat, record.lon, record.alt, record.sat) == (-33.9, -70.6, -12, 0)


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
field_text = st.binary(max_size=80) | st.text(max_size=80)


def assert_total(fields: Any) -> None:
    result = decode_entry(STREAM_ID, fields)
    assert isinstance(result, Record | Rejection)


@settings(deadline=None)  # CI machines are shared: no per-example time limit
@given(st.binary(max_size=2_000))
def test_any_payload_bytes_give_a_record_or_a_rejection(payload: bytes) -> None:
    assert_total(entry(payload))


@settings(deadline=None)
@given(st.text(max_size=2_000))
def test_any_payload_text_gives_a_record_or_a_rejection(payload: str) -> None:
    assert_total({"v": "1", "imei": IMEI, "payload": payload})


@settings(deadline=None)
@given(st.dictionaries(field_text, field_text, max_size=5))
def test_any_fields_give_a_record_or_a_rejection(fields: dict[Any, Any]) -> None:
    assert_total(fields)


@settings(deadline=None)
@given(json_values)
def test_any_json_payload_is_rejected_by_a_named_check(value: Any) -> None:
    result = decode_entry(STREAM_ID, entry(dumps(value)))
    assert isinstance(result, Rejection | Record)
    if isinstance(result, Rejection):
        assert not result.detail.startswith("undecodable"), result


@settings(deadline=None)
@given(st.sampled_from(sorted(BASE)), json_values)
def test_any_value_in_any_key_gives_a_record_or_a_named_rejection(key: str, value: Any) -> None:
    result = decode_entry(STREAM_ID, with_keys(**{key: value}))
    if isinstance(result, Rejection):
        assert not result.detail.startswith("undecodable"), result


@settings(deadline=None)
@given(st.dictionaries(st.integers(0, 65535).map(str), json_values, max_size=8))
def test_any_io_object_gives_a_record_or_a_named_rejection(io: dict[str, Any]) -> None:
    result = decode_entry(STREAM_ID, with_keys(io=io))
    if isinstance(result, Rejection):
        assert not result.detail.startswith("undecodable"), result
    else:
        assert all(type(v) in (int, bytes) for v in result.io.values())


# --- round trip through an independent encoder ------------------------------------------

io_values = (
    st.integers(0, 2**32 - 1)
    | st.integers(2**32, MAX_U64)
    | st.integers(2**53, MAX_U64)
    | st.binary(max_size=64)
)
records = st.builds(
    Record,
    codec=st.sampled_from([8, 16, 142]),
    ts=st.integers(0, MAX_TS_MS),
    received_at=st.integers(0, MAX_TS_MS),
    priority=st.integers(0, 2),
    lat=st.floats(-90, 90, allow_nan=False),
    lon=st.floats(-180, 180, allow_nan=False),
    alt=st.integers(-32768, 32767),
    angle=st.integers(0, 359),
    sat=st.integers(0, 255),
    speed=st.integers(0, 65535),
    event_io=st.integers(0, 65535),
    io=st.dictionaries(st.integers(0, 65535), io_values, max_size=40),
    generation=st.none() | st.integers(0, 255),
    stream_id=st.just(STREAM_ID),
    imei=st.from_regex(r"\A[0-9]{15}\Z"),
)


def encode_value(value: int | bytes) -> int | dict[str, str]:
    """IO value as ingestion writes it: 8-byte ints and raw bytes become sentinels."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    return value if value < 2**32 else {"$bigint": str(value)}


def encode(record: Record) -> dict[bytes, bytes]:
    """A stream entry for ``record`` in the contract v1 shape (as the TypeScript side does)."""
    payload = {
        "codec": record.codec,
        "ts": record.ts,
        "received_at": record.received_at,
        "priority": record.priority,
        "lat": record.lat,
        "lon": record.lon,
        "alt": record.alt,
        "angle": record.angle,
        "sat": record.sat,
        "speed": record.speed,
        "event_io": record.event_io,
        "generation": record.generation,
        "io": {str(k): encode_value(v) for k, v in record.io.items()},
    }
    return {b"v": b"1", b"imei": record.imei.encode(), b"payload": dumps(payload)}


@settings(deadline=None)
@given(records)
def test_encoded_record_decodes_to_itself(record: Record) -> None:
    record.device_id = int(record.imei)
    assert decode_entry(STREAM_ID, encode(record)) == record


@settings(deadline=None)
@given(st.integers(2**53 + 1, MAX_U64))
def test_64_bit_values_above_2_53_are_exact(value: int) -> None:
    decoded = decode_entry(STREAM_ID, with_io({"$bigint": str(value)}))
    assert isinstance(decoded, Record)
    assert decoded.io[78] == value
    assert type(decoded.io[78]) is int


def test_device_identity_cache_stays_bounded_and_exact() -> None:
    from processor.core import contract

    payload = dumps(BASE)
    for n in range(contract._IMEI_CACHE_SIZE + 10):
        imei = f"{n:015d}"
        record = decode_entry(STREAM_ID, entry(payload, imei=imei.encode()))
        assert isinstance(record, Record)
        assert (record.imei, record.device_id) == (imei, n)
    assert len(contract._imeis) <= contract._IMEI_CACHE_SIZE
    bad = decode_entry(STREAM_ID, entry(payload, imei=b"00000000000001x"))
    assert isinstance(bad, Rejection)
    assert bad.reason == BAD_TYPE


def test_whitespace_and_key_order_do_not_matter() -> None:
    pretty = json.dumps(dict(reversed(BASE.items())), indent=2).encode()
    assert decode_entry(STREAM_ID, entry(pretty)) == decode_entry(STREAM_ID, entry(dumps(BASE)))
