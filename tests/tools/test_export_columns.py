"""The native column builder gives exactly the contract decoder's rows, or leaves the entry.

Payload texts are generated around every edge of the contract (number forms, ranges,
IO ids and values, sentinels, repeated and unknown keys, spacing, field shapes); a read of
them through the native builder must equal the contract decoder's records and
rejections, entry by entry, in stream order.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.tools import export_decode
from processor.tools.export_decode import decode_entries
from processor.tools.export_schema import records_to_batch

pytestmark = pytest.mark.skipif(not export_decode.NATIVE, reason="C extension not built")

IMEI = b"356307042441013"


def text(pairs: list[tuple[str, str]], space: str = "") -> bytes:
    """A JSON object from (key, value text) pairs, repeats and all."""
    inner = f",{space}".join(f'"{key}":{space}{value}' for key, value in pairs)
    return ("{" + space + inner + space + "}").encode()


VALID: dict[str, str] = {
    "codec": "8",
    "ts": "1700000000000",
    "received_at": "1700000000100",
    "priority": "1",
    "lat": "45.123456",
    "lon": "-7.5",
    "alt": "120",
    "angle": "90",
    "sat": "11",
    "speed": "54",
    "event_io": "0",
    "io": '{"1":1,"66":12800,"78":{"$bigint":"18446744073709551615"},"256":{"$bytes":"3q2+7w=="}}',
}
RANGES: dict[str, tuple[int, int]] = {
    "ts": (0, 253_402_300_799_999),
    "received_at": (0, 253_402_300_799_999),
    "priority": (0, 2),
    "alt": (-32_768, 32_767),
    "angle": (0, 359),
    "sat": (0, 255),
    "speed": (0, 65_535),
    "event_io": (0, 65_535),
}
BOUNDS: dict[str, float] = {"lat": 90.0, "lon": 180.0}


@st.composite
def valid_int(draw: st.DrawFn, low: int, high: int) -> str:
    value = draw(st.one_of(st.integers(low, high), st.sampled_from([low, high])))
    return "-0" if value == 0 and draw(st.booleans()) else str(value)


@st.composite
def valid_float(draw: st.DrawFn, bound: float) -> str:
    """A number in range, written the ways a JSON writer may write it."""
    value = draw(st.one_of(st.floats(-bound, bound), st.sampled_from([-bound, bound, 0.0])))
    forms = [
        repr(value),
        f"{value:.6f}",
        f"{value:.17g}",
        f"{value:.15e}",
        f"{value:.3E}",
        f"{value:.30f}",
        str(int(value)),
        "-0",
        "-0.0",
        "0.1e-0",
    ]
    form = draw(st.sampled_from(forms))
    return form if float(form) == value or abs(float(form)) <= bound else repr(value)


@st.composite
def valid_io_value(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["int"] * 6 + ["zero", "bigint", "bytes", "spaced"]))
    if kind == "int":
        return str(draw(st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1))))
    if kind == "zero":
        return "-0"
    if kind == "bigint":
        value = str(draw(st.integers(0, 2**64 - 1)))
        return '{"$bigint":"' + draw(st.sampled_from([value, "00" + value])) + '"}'
    raw = draw(st.binary(max_size=12))
    if kind == "spaced":
        return '{ "$bytes" : "' + base64.b64encode(raw).decode() + '" }'
    return '{"$bytes":"' + base64.b64encode(raw).decode() + '"}'


@st.composite
def valid_io(draw: st.DrawFn) -> list[tuple[str, str]]:
    ids = draw(st.lists(st.integers(0, 65_535), max_size=10, unique=True))
    return [(str(n), draw(valid_io_value())) for n in ids]


def io_object(pairs: list[tuple[str, str]]) -> str:
    return text(pairs).decode()


# Edges: one of these replaces a field's valid value (most are rejected, some accepted).
EDGES: dict[str, list[str]] = {
    "codec": ["12", "8.0", "-8", "08", "142", "16"],
    "ts": ["-1", "253402300800000", "1e12", "1700000000000.0", "17000000000000000000000"],
    "received_at": ["-1", "253402300800000"],
    "priority": ["-1", "3", "1.0", "true"],
    "lat": ["90.0000000001", "-90.1", "1e999", "-1e999", "NaN", "45.", ".5", "01.5", "4e", "null"],
    "lon": ["180.00000000001", "-181", '"1"', "1.5e-400", "2.5E+2"],
    "alt": ["-32769", "32768", "1e2"],
    "angle": ["360", "-1"],
    "sat": ["256", "-1"],
    "speed": ["65536", "-1"],
    "event_io": ["65536", "1.5"],
    "generation": ["256", "-1", "1.0", '"1"', "nul", "null", "0"],
}
IO_EDGES: list[tuple[str, str]] = [
    ("066", "1"),
    ("-0", "1"),
    ("+1", "1"),
    ("65536", "1"),
    ("", "1"),
    ("\\u0031", "1"),
    ("7", "-1"),
    ("7", "4294967296"),
    ("7", "1.0"),
    ("7", "null"),
    ("7", '"5"'),
    ("7", "{}"),
    ("7", '{"$bigint":"18446744073709551616"}'),
    ("7", '{"$bigint":""}'),
    ("7", '{"$bigint":"1a"}'),
    ("7", '{"$bigint":"5","$bytes":"AA=="}'),
    ("7", '{"$bigint":null}'),
    ("7", '{"$bytes":"AB=="}'),
    ("7", '{"$bytes":"AQ"}'),
    ("7", '{"$bytes":"A==="}'),
    ("7", '{"$bytes":"QUJD\\u0044"}'),
    ("7", '{"$other":"1"}'),
]


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    """A valid payload (numbers and IO written in every accepted form, keys in any order,
    generation absent, null or a number), with at most one change that may make it
    invalid: a field at an edge, a key missing, repeated, unknown or escaped, an IO id
    or value at an edge or repeated, spacing, bytes after the object."""
    pairs = [("codec", draw(st.sampled_from(["8", "16", "142"])))]
    pairs += [(key, draw(valid_int(*RANGES[key]))) for key in RANGES]
    pairs += [(key, draw(valid_float(bound))) for key, bound in BOUNDS.items()]
    io = draw(valid_io())
    generation = draw(st.sampled_from([None, None, "null", "3", "255"]))
    if generation is not None:
        pairs.append(("generation", generation))
    space, tail = "", b""
    change = draw(st.integers(0, 11))
    if change == 1:
        key = draw(st.sampled_from(sorted(EDGES)))
        pairs = [pair for pair in pairs if pair[0] != key]
        pairs.append((key, draw(st.sampled_from(EDGES[key]))))
    elif change == 2:
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    elif change == 3:
        pairs.append(draw(st.sampled_from(pairs)))
    elif change == 4:
        pairs.append(
            draw(st.sampled_from([("extra", "1"), ("@@imei", '"1"'), ("c\\u006fdec", "8")]))
        )
    elif change == 5:
        io.insert(draw(st.integers(0, len(io))), draw(st.sampled_from(IO_EDGES)))
    elif change == 6 and io:
        io.append(io[0])  # an IO id twice
    elif change == 7:
        space = draw(st.sampled_from([" ", "\n\t", "\r\n  "]))
    elif change == 8:
        tail = draw(st.sampled_from([b" ", b"x", b"\x00", b"}", "é".encode(), b"\n"]))
    pairs.append(("io", io_object(io)))
    return text(draw(st.permutations(pairs)), space) + tail


@st.composite
def entry(draw: st.DrawFn) -> list[Any]:
    """An entry's field list as Redis replies it, usually of the contract's shape."""
    fields = [b"v", b"1", b"imei", IMEI, b"payload", draw(payload())]
    shape = draw(st.integers(0, 39))
    if shape == 0:
        fields[1] = b"2"
    elif shape == 1:
        fields[3] = b"35630704244101x"
    elif shape == 2:
        fields = fields[:4]
    elif shape == 3:
        fields = [b"imei", IMEI, b"v", b"1", b"payload", fields[5]]
    elif shape == 4:
        fields = []  # deleted since delivered
    return fields


def python_read(ids: list[str], flats: list[Any], max_bytes: int, max_io: int) -> Any:
    records, rejections = decode_entries(export_decode._entries(ids, flats), max_bytes, max_io)
    return records, [(sid, rejection) for sid, rejection, _ in rejections]


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def resp_reply(ids: list[str], flats: list[Any]) -> bytearray:
    """The RESP2 bytes Redis sends for these entries (a deleted entry's fields are nil)."""
    out = [b"*1\r\n*2\r\n", bulk(b"records"), b"*%d\r\n" % len(ids)]
    for sid, fields in zip(ids, flats, strict=True):
        out += [b"*2\r\n", bulk(sid.encode())]
        out += [b"*%d\r\n" % len(fields), *map(bulk, fields)] if fields else [b"*-1\r\n"]
    return bytearray(b"".join(out))


def native_read(
    ids: list[str], flats: list[Any], max_bytes: int, max_io: int, via: str = "items"
) -> Any:
    """The entries through the native builder: from the items redis-py parses, or from
    the reply's bytes as the exporter reads them."""
    if via == "reply":
        reply = resp_reply(ids, flats)
        return export_decode.decode_reply(reply, len(reply), max_bytes, max_io)
    items = [[sid.encode(), fields] for sid, fields in zip(ids, flats, strict=True)]
    return export_decode.decode_items(items, " ".join(ids), max_bytes, max_io)


VIA = pytest.mark.parametrize("via", ["items", "reply"])


@VIA
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entry(), min_size=1, max_size=12), st.sampled_from([(65_536, 512), (300, 3)]))
def test_the_native_read_gives_the_contract_decoders_rows(
    via: str, flats: list[Any], limits: tuple[int, int]
) -> None:
    ids = [f"1700000000000-{n}" for n in range(len(flats))]
    records, rejections = python_read(ids, flats, *limits)
    decoded = native_read(ids, flats, *limits, via=via)
    expected = records_to_batch(records) if records else None
    if expected is None:
        assert decoded.chunk is None
    else:
        assert decoded.chunk is not None
        assert decoded.chunk.equals(expected), (decoded.chunk.to_pylist(), records)
    assert decoded.rejections == rejections
    assert decoded.id_list() == ids


def test_usual_entries_are_all_taken_natively() -> None:
    """The bench's entries (plain and with sentinels) never fall back to Python, whether
    built from parsed items or from the reply's bytes."""
    from benchmarks.common import make_entries

    assert export_decode.export_columns is not None
    assert export_decode.export_reply is not None
    for sentinels in (False, True):
        entries = make_entries(500, sentinels=sentinels)
        ids = [f"1-{n}" for n in range(len(entries))]
        flats = [[b"v", e[b"v"], b"imei", e[b"imei"], b"payload", e[b"payload"]] for e in entries]
        items = [[sid.encode(), fields] for sid, fields in zip(ids, flats, strict=True)]
        rows, _buffers, nulls, skipped = export_decode.export_columns(items, 65_536, 512)
        assert (rows, nulls, skipped) == (500, 500, [])
        reply = resp_reply(ids, flats)
        built = export_decode.export_reply(reply, len(reply), 65_536, 512)
        assert (built[0], built[2], built[3], built[4]) == (500, 500, [], [])
        assert built[5] == " ".join(ids).encode()


@pytest.mark.parametrize(
    ("lat", "expected"),
    [
        ("-0", 0.0),
        ("-0.0", -0.0),
        ("45", 45.0),
        ("89.99999999999999999999999", 90.0),
        ("0.1e-0", 0.1),
        ("1.7976931348623157e308", None),
        ("45.000000000000001", 45.0),
    ],
)
@VIA
def test_float_forms(via: str, lat: str, expected: float | None) -> None:
    flats = [[b"v", b"1", b"imei", IMEI, b"payload", text(list(dict(VALID, lat=lat).items()))]]
    decoded = native_read(["1-0"], flats, 65_536, 512, via)
    if expected is None:
        assert decoded.chunk is None
        assert decoded.rejections[0][1].reason == "out_of_range"
        return
    assert decoded.chunk is not None
    value = decoded.chunk.column("lat")[0].as_py()
    assert json.dumps(value) == json.dumps(expected)  # -0.0 and 0.0 told apart


@VIA
def test_rows_of_skipped_entries_keep_stream_order(via: str) -> None:
    """Entries the builder leaves (here: spaced and escaped) come back in their place."""
    plain = text(list(VALID.items()))
    spaced = text(list(VALID.items()), " ").replace(b'"io"', b'"\\u0069o"')
    payloads = [plain, spaced, plain, b"{", spaced, plain]
    flats = [[b"v", b"1", b"imei", IMEI, b"payload", p] for p in payloads]
    ids = [f"5-{n}" for n in range(len(flats))]
    decoded = native_read(ids, flats, 65_536, 512, via)
    assert decoded.chunk is not None
    assert decoded.chunk.column("stream_id").to_pylist() == ["5-0", "5-1", "5-2", "5-4", "5-5"]
    assert [sid for sid, _ in decoded.rejections] == ["5-3"]


def _compare(payload: bytes) -> None:
    flats = [[b"v", b"1", b"imei", IMEI, b"payload", payload]]
    records, rejections = python_read(["1-0"], flats, 65_536, 512)
    for via in ("items", "reply"):
        _compare_via(via, flats, records, rejections)


def _compare_via(via: str, flats: list[Any], records: Any, rejections: Any) -> None:
    decoded = native_read(["1-0"], flats, 65_536, 512, via)
    assert decoded.rejections == rejections
    if records:
        assert decoded.chunk is not None
        assert decoded.chunk.equals(records_to_batch(records))
    else:
        assert decoded.chunk is None


@pytest.mark.parametrize(
    ("key", "value"), [(key, value) for key, values in EDGES.items() for value in values]
)
def test_each_field_edge(key: str, value: str) -> None:
    _compare(text(list(dict(VALID, **{key: value}).items())))


@pytest.mark.parametrize(("io_id", "value"), IO_EDGES)
def test_each_io_edge(io_id: str, value: str) -> None:
    _compare(text(list(dict(VALID, io=io_object([("1", "5"), (io_id, value)])).items())))
