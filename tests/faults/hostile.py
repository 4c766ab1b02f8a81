"""Generated hostile stream entries, and valid ones that carry hostile content.

Each hostile entry is built by one named *kind* (huge, deeply nested, not UTF-8, sentinel
abuse, NaN, 10,000-digit numbers, injection strings in every field, too many IO
elements, duplicate keys, unexpected stream fields, binary garbage...). The valid entries
include records whose ``$bytes`` IO values carry the same injection strings and records
dated decades off: those must be stored verbatim, not rejected.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..integration.pipeline_helpers import imei, payload

Fields = dict[bytes, bytes]

INJECTIONS: list[bytes] = [
    b"'; DROP TABLE positions; --",
    b"1 OR 1=1",
    b"$(rm -rf /)",
    b"`reboot`",
    b'"}, "lat": 0, "x": {"',
    b"redis.call('FLUSHALL')",
    b"\x00\x00NUL\x00",
    b"\\u0000",
    b"<script>alert(1)</script>",
    b"../../../../etc/passwd",
    b"%s%s%s%n",
    b"\r\nXADD evil * a b\r\n",
]


@dataclass(frozen=True)
class Generated:
    """Entries in production order, which are valid, and each hostile one's kind."""

    entries: list[Fields]
    valid: list[int]  # indexes of valid entries
    kinds: dict[int, str]  # index → kind of each hostile entry


def _entry(imei_text: bytes, body: bytes, v: bytes = b"1") -> Fields:
    return {b"v": v, b"imei": imei_text, b"payload": body}


def _json(device: int, i: int, **changes: Any) -> bytes:
    return orjson.dumps(payload(device, i, **changes))


def _replace_key(body: bytes, key: str, raw: bytes) -> bytes:
    """The payload with ``"key": <value>`` replaced by raw JSON text."""
    data = orjson.loads(body)
    marker = "\u0001MARK\u0001"
    data[key] = marker
    return orjson.dumps(data).replace(orjson.dumps(marker), raw)


def _io(io: dict[str, Any], device: int, i: int) -> bytes:
    return _json(device, i, io=io)


def _quoted(text: bytes) -> bytes:
    return orjson.dumps(text.decode("utf-8", "replace"))


# Each maker builds one hostile entry from a random source and an injection string.
Maker = Callable[[random.Random, int, bytes], Fields]

_NUMBER_KEYS = ["ts", "received_at", "lat", "lon", "alt", "angle", "sat", "speed", "codec"]


def _huge(rng: random.Random, i: int, inj: bytes) -> Fields:
    pad = "A" * rng.randint(70_000, 300_000)
    return _entry(imei(1).encode(), _json(1, i, io={"256": {"$bytes": pad}}))


def _nested(rng: random.Random, i: int, inj: bytes) -> Fields:
    depth = rng.choice([100, 1_000, 5_000])
    deep = b"[" * depth + b"]" * depth
    return _entry(imei(2).encode(), _replace_key(_json(2, i), "io", deep))


def _nested_objects(rng: random.Random, i: int, inj: bytes) -> Fields:
    depth = rng.choice([50, 500, 3_000])
    deep = b'{"$bigint":' * depth + b'"1"' + b"}" * depth
    return _entry(imei(3).encode(), _replace_key(_json(3, i), "io", b'{"78":' + deep + b"}"))


def _not_utf8(rng: random.Random, i: int, inj: bytes) -> Fields:
    body = _json(4, i)
    cut = rng.randrange(1, len(body) - 1)
    return _entry(
        imei(4).encode(),
        body[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + body[cut:],
    )


def _latin1(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(
        imei(4).encode(), _json(4, i, io={"256": {"$bytes": "é"}}).replace(b"\xc3\xa9", b"\xe9")
    )


def _utf16(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(4).encode(), _json(4, i).decode().encode("utf-16"))


_SENTINELS: list[Any] = [
    {"$bigint": "1", "$bytes": "AA=="},
    {"$bigint": 5},
    {"$bigint": "-1"},
    {"$bigint": "18446744073709551616"},
    {"$bigint": "1e3"},
    {"$bigint": ""},
    {"$bytes": "not base64!"},
    {"$bytes": "QQ"},
    {"$bytes": 12},
    {"$foo": "1"},
    {},
    {"$bigint": None},
    [1, 2],
    "text",
    -1,
    4294967296,
    1.5,
    True,
]


def _sentinel_abuse(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(5).encode(), _io({"16": rng.choice(_SENTINELS)}, 5, i))


def _sentinel_elsewhere(rng: random.Random, i: int, inj: bytes) -> Fields:
    key = rng.choice(_NUMBER_KEYS)
    return _entry(imei(5).encode(), _json(5, i, **{key: {"$bigint": "1"}}))


def _nan(rng: random.Random, i: int, inj: bytes) -> Fields:
    raw = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"nan"])
    return _entry(imei(6).encode(), _replace_key(_json(6, i), rng.choice(_NUMBER_KEYS), raw))


def _long_number(rng: random.Random, i: int, inj: bytes) -> Fields:
    digits = b"9" * 10_000
    raw = rng.choice([digits, b"-" + digits, digits + b".5"])
    key = rng.choice([*_NUMBER_KEYS, "io"])
    if key == "io":
        return _entry(imei(7).encode(), _replace_key(_json(7, i), "io", b'{"66":' + raw + b"}"))
    return _entry(imei(7).encode(), _replace_key(_json(7, i), key, raw))


def _inject_number_field(rng: random.Random, i: int, inj: bytes) -> Fields:
    key = rng.choice([*_NUMBER_KEYS, "priority", "event_io", "generation"])
    return _entry(imei(8).encode(), _replace_key(_json(8, i), key, _quoted(inj)))


def _inject_imei(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(inj, _json(8, i))


def _inject_version(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(8).encode(), _json(8, i), v=inj)


def _inject_io_key(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(8).encode(), _io({inj.decode("utf-8", "replace"): 1}, 8, i))


def _inject_io_value(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(8).encode(), _io({"66": inj.decode("utf-8", "replace")}, 8, i))


def _inject_bigint(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(8).encode(), _io({"16": {"$bigint": inj.decode("utf-8", "replace")}}, 8, i))


def _inject_payload_key(rng: random.Random, i: int, inj: bytes) -> Fields:
    body = orjson.loads(_json(8, i))
    body[inj.decode("utf-8", "replace")] = 1
    return _entry(imei(8).encode(), orjson.dumps(body))


def _inject_whole_payload(rng: random.Random, i: int, inj: bytes) -> Fields:
    return _entry(imei(8).encode(), inj)


def _reserved_keys(rng: random.Random, i: int, inj: bytes) -> Fields:
    key = rng.choice(["@@stream_id", "@@imei", "@@device_id"])
    value: Any = 356307040000001 if key == "@@device_id" else inj.decode("utf-8", "replace")
    return _entry(imei(9).encode(), _json(9, i, **{key: value}))


def _many_io(rng: random.Random, i: int, inj: bytes) -> Fields:
    count = rng.choice([513, 1_000, 5_000])
    return _entry(imei(10).encode(), _io({str(k): 1 for k in range(count)}, 10, i))


def _duplicate_keys(rng: random.Random, i: int, inj: bytes) -> Fields:
    body = _json(11, i)
    key = rng.choice(["ts", "lat", "imei_", "io", "same_ts", "io_id", "io_id_zero"])
    if key == "same_ts":  # a well-typed repeat: parsers disagree on which value counts
        return _entry(imei(11).encode(), body[:-1] + f',"ts":{1_780_000_000_000 + i}}}'.encode())
    if key == "io_id":
        return _entry(imei(11).encode(), body.replace(b'"io":{', b'"io":{"66":1,', 1))
    if key == "io_id_zero":  # "066" and "66" are one IO id
        return _entry(imei(11).encode(), body.replace(b'"io":{', b'"io":{"066":1,', 1))
    if key == "io":
        return _entry(imei(11).encode(), body[:-1] + b',"io":{"239":"x"}}')
    if key == "imei_":
        return _entry(imei(11).encode(), body[:-1] + b',"codec":"x","codec":9}')
    return _entry(imei(11).encode(), body[:-1] + f',"{key}":"dup"}}'.encode())


def _extra_stream_field(rng: random.Random, i: int, inj: bytes) -> Fields:
    fields = _entry(imei(12).encode(), _json(12, i))
    fields[rng.choice([b"x", inj, b"payload2", b"\xff\xfe"])] = inj
    return fields


def _missing_stream_field(rng: random.Random, i: int, inj: bytes) -> Fields:
    fields = _entry(imei(12).encode(), _json(12, i))
    del fields[rng.choice([b"v", b"imei", b"payload"])]
    return fields


def _garbage(rng: random.Random, i: int, inj: bytes) -> Fields:
    size = rng.randint(1, 2_000)
    junk = bytes(rng.getrandbits(8) for _ in range(size))
    which = rng.choice(["payload", "imei", "fields"])
    if which == "payload":
        return _entry(imei(13).encode(), junk)
    if which == "imei":
        return _entry(junk[:15], _json(13, i))
    return {junk[:8] or b"\x00": junk, b"v": b"1"}


def _wrong_shapes(rng: random.Random, i: int, inj: bytes) -> Fields:
    raw = rng.choice([b"[]", b"null", b"1", b'"text"', b"{}", b"", b"{" * 10, b'{"io":{}}'])
    return _entry(imei(14).encode(), raw)


def _out_of_range(rng: random.Random, i: int, inj: bytes) -> Fields:
    key, value = rng.choice(
        [
            ("lat", 90.0001),
            ("lon", -180.5),
            ("angle", 360),
            ("ts", -1),
            ("priority", 3),
            ("codec", 7),
            ("speed", 65536),
            ("sat", 256),
            ("alt", 40_000),
            ("ts", 10**15),
        ]
    )
    return _entry(imei(15).encode(), _json(15, i, **{key: value}))


MAKERS: dict[str, Maker] = {
    "huge": _huge,
    "nested_arrays": _nested,
    "nested_sentinels": _nested_objects,
    "not_utf8": _not_utf8,
    "latin1": _latin1,
    "utf16": _utf16,
    "sentinel_abuse": _sentinel_abuse,
    "sentinel_outside_io": _sentinel_elsewhere,
    "nan_infinity": _nan,
    "10000_digits": _long_number,
    "injection_in_number_field": _inject_number_field,
    "injection_in_imei": _inject_imei,
    "injection_in_version": _inject_version,
    "injection_in_io_key": _inject_io_key,
    "injection_in_io_value": _inject_io_value,
    "injection_in_bigint": _inject_bigint,
    "injection_as_payload_key": _inject_payload_key,
    "injection_as_payload": _inject_whole_payload,
    "reserved_keys": _reserved_keys,
    "too_many_io": _many_io,
    "duplicate_keys": _duplicate_keys,
    "unexpected_stream_field": _extra_stream_field,
    "missing_stream_field": _missing_stream_field,
    "binary_garbage": _garbage,
    "wrong_shape": _wrong_shapes,
    "out_of_range": _out_of_range,
}

# Valid records dated by broken clocks (GPS week rollover, no time sync): stored, not timed.
BAD_CLOCKS_MS = [1_072_915_200_000, 3_471_292_800_000]  # 2004-01-01, 2080-01-01


def valid_entry(rng: random.Random, device: int, i: int) -> Fields:
    """A valid entry; one in five carries an injection string as ``$bytes`` content."""
    roll = rng.random()
    if roll < 0.2:
        raw = base64.b64encode(rng.choice(INJECTIONS)).decode()
        return _entry(
            imei(100 + device).encode(), _io({"239": 1, "256": {"$bytes": raw}}, 100 + device, i)
        )
    if roll < 0.22:
        ts = rng.choice(BAD_CLOCKS_MS) + i * 1000
        return _entry(imei(100 + device).encode(), _json(100 + device, i, ts=ts, received_at=ts))
    return _entry(imei(100 + device).encode(), _json(100 + device, i))


def generate(hostile: int, valid: int, seed: int) -> Generated:
    """``hostile`` malicious entries (every kind in turn) interleaved with ``valid`` ones."""
    rng = random.Random(seed)
    kinds = list(MAKERS)
    marks = [True] * hostile + [False] * valid
    rng.shuffle(marks)
    entries: list[Fields] = []
    valid_at: list[int] = []
    kind_at: dict[int, str] = {}
    for index, bad in enumerate(marks):
        if bad:
            kind = kinds[len(kind_at) % len(kinds)]
            kind_at[index] = kind
            entries.append(MAKERS[kind](rng, index, rng.choice(INJECTIONS)))
        else:
            valid_at.append(index)
            entries.append(valid_entry(rng, len(valid_at) % 200, index))
    return Generated(entries, valid_at, kind_at)
