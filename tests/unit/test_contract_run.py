"""decode_run: a run of entries decoded at once gives exactly decode_entry's records, or
None (then each entry is decoded alone), never a record decode_entry would not give."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.contract import decode_entry, decode_run
from processor.core.pipeline import _decode_run
from processor.core.records import Record

from ..faults.hostile import generate
from ..integration.pipeline_helpers import imei, payload
from .test_contract import BASE, MALFORMED, STREAM_ID, dumps, encode, entry, records

USUAL = {b"v", b"imei", b"payload"}


def assert_as_decode_entry(entries: list[Any], **limits: int) -> list[Record] | None:
    """decode_run gives None or exactly the records decode_entry gives every entry.

    Entries not of the usual shape (the three fields, bytes-named) are not given to
    decode_run (its callers decode those one by one): None.
    """
    if not all(type(e) is dict and e.keys() == USUAL for e in entries):
        return None
    ids = [f"1-{n}" for n in range(len(entries))]
    got = decode_run(
        ids,
        [e[b"v"] for e in entries],
        [e[b"imei"] for e in entries],
        [e[b"payload"] for e in entries],
        **limits,
    )
    one_by_one = [decode_entry(sid, e, **limits) for sid, e in zip(ids, entries, strict=True)]
    if got is not None:
        assert got == one_by_one
        assert all(type(record) is Record for record in got)
    return got


def valid(n: int) -> dict[bytes, bytes]:
    return {
        b"v": b"1",
        b"imei": imei(n % 7).encode(),
        b"payload": orjson.dumps(payload(n % 7, n)),
    }


def test_a_run_of_valid_entries_is_decoded_at_once() -> None:
    entries = [valid(n) for n in range(50)] + [entry(dumps(BASE))]
    assert assert_as_decode_entry(entries) is not None
    assert decode_run([], [], [], []) == []


@pytest.mark.parametrize(
    "bad", [f for _, f, _ in MALFORMED], ids=[name for name, _, _ in MALFORMED]
)
def test_a_run_holding_an_invalid_entry_is_left_to_decode_entry(bad: Any) -> None:
    entries = [valid(1), valid(2), bad, valid(3)]
    assert assert_as_decode_entry(entries) is None


REPEATS = [
    b',"ts":1780000009000}',
    b',"generation":null}',
    b',"generation":4}',
    b',"t\\u0073":1780000009000}',
]


@pytest.mark.parametrize("extra", REPEATS)
def test_a_repeated_key_is_never_hidden_by_the_other_entries_of_the_run(extra: bytes) -> None:
    # One entry repeats a key, another lacks "generation": the run's key counts could
    # balance out if they were compared as a sum of the wrong things.
    repeated = {**valid(1), b"payload": orjson.dumps(payload(1, 1))[:-1] + extra}
    body = {k: v for k, v in payload(2, 2).items() if k != "generation"}
    lacking = {**valid(2), b"payload": orjson.dumps(body)}
    assert assert_as_decode_entry([repeated, lacking]) is None
    assert assert_as_decode_entry([lacking, valid(3)]) is not None


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(payload(1, 5), indent=2).encode(),
        orjson.dumps(payload(1, 5)).replace(b'"generation"', b'"gener\\u0061tion"'),
        orjson.dumps(payload(1, 5)).replace(b'"$bigint"', b'"\\u0024bigint"'),
        orjson.dumps({**payload(1, 5), "@@imei": ""}),
    ],
)
def test_unusual_valid_payloads_decode_the_same_either_way(raw: bytes) -> None:
    assert_as_decode_entry([valid(1), {**valid(2), b"payload": raw}])


def test_limits_apply_to_the_run_as_to_each_entry() -> None:
    entries = [valid(n) for n in range(10)]
    assert assert_as_decode_entry(entries, max_entry_bytes=200) is None
    assert assert_as_decode_entry(entries, max_io_elements=2) is None
    assert assert_as_decode_entry(entries, max_entry_bytes=2_000, max_io_elements=5) is not None


def test_generated_hostile_and_valid_entries_decode_the_same_either_way() -> None:
    generated = generate(hostile=600, valid=600, seed=11)
    entries = generated.entries
    for start in range(0, len(entries), 7):
        assert_as_decode_entry(entries[start : start + 7])
    assert assert_as_decode_entry([entries[n] for n in generated.valid]) is not None


@settings(deadline=None)
@given(st.lists(records, min_size=1, max_size=8))
def test_encoded_records_decode_at_once_to_themselves(run: list[Record]) -> None:
    for record in run:
        record.device_id = int(record.imei)
    got = assert_as_decode_entry([encode(record) for record in run])
    assert got is not None
    assert [r.stream_id for r in got] == [f"1-{n}" for n in range(len(run))]
    assert [(r.io, r.imei) for r in got] == [(r.io, r.imei) for r in run]


def test_run_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        decode_run([STREAM_ID], [b"1"], [], [b"{}"])


def test_the_pipeline_decodes_a_run_only_when_every_entry_has_exactly_the_three_fields() -> None:
    run = [(f"1-{n}", valid(n)) for n in range(20)]
    records = _decode_run(run, 65_536, 512)
    assert records == [decode_entry(sid, fields) for sid, fields in run]
    extra = [*run[:5], ("1-99", valid(99) | {b"x": b"1"}), *run[5:]]
    renamed = [*run[:5], ("1-99", {b"v": b"1", b"imei": b"1", b"body": b"{}"}), *run[5:]]
    text_keys = [(sid, {k.decode(): v for k, v in fields.items()}) for sid, fields in run]
    for entries in (extra, renamed, text_keys, []):
        assert _decode_run(entries, 65_536, 512) is None  # type: ignore[arg-type]
