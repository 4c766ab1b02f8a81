"""The contract decoder against the generated hostile entries, without any server.

Every hostile entry is rejected with a reason, every valid one (hostile content in
``$bytes``, clocks decades off) is accepted; repeated JSON keys are rejected because
parsers disagree on which value a repeated key means.
"""

from __future__ import annotations

import collections
import json

import orjson
import pytest

from processor.core.attributes import IoElement, compile_decoder
from processor.core.contract import INVALID_JSON, decode_entry
from processor.core.records import Record, Rejection

from ..integration.pipeline_helpers import imei, payload
from .hostile import MAKERS, generate


def test_every_generated_hostile_entry_is_rejected_and_every_valid_one_accepted() -> None:
    generated = generate(hostile=3_000, valid=1_000, seed=5)
    reasons: collections.Counter[tuple[str, str]] = collections.Counter()
    for index, fields in enumerate(generated.entries):
        outcome = decode_entry(f"1-{index}", fields)
        if index in generated.kinds:
            assert type(outcome) is Rejection, (generated.kinds[index], fields)
            assert outcome.reason
            assert outcome.detail
            reasons[(generated.kinds[index], outcome.reason)] += 1
        else:
            assert type(outcome) is Record, (outcome, fields)
    assert {kind for kind, _ in reasons} == set(MAKERS)


def body_with(extra: bytes) -> bytes:
    return orjson.dumps(payload(1, 5))[:-1] + extra


REPEATED = Rejection(INVALID_JSON, "payload names a key twice in one JSON object")


@pytest.mark.parametrize(
    "raw",
    [
        body_with(b',"ts":1780000009000}'),
        body_with(b',"lat":45.0}'),
        body_with(b',"generation":null}'),
        orjson.dumps(payload(1, 5)).replace(b'"io":{', b'"io":{"239":0,'),
        orjson.dumps(payload(1, 5, generation=3))[:-1] + b',"generation":4}',
        orjson.dumps(payload(1, 5, io={"78": {"$bigint": "1"}})).replace(
            b'{"$bigint":"1"}', b'{"$bigint":"1","$bigint":"2"}'
        ),
        body_with(b',"t\\u0073":1780000009000}'),
    ],
)
def test_a_repeated_key_is_rejected_as_invalid_json(raw: bytes) -> None:
    outcome = decode_entry("1-1", {b"v": b"1", b"imei": imei(1).encode(), b"payload": raw})
    assert outcome == REPEATED


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(payload(1, 5), indent=2).encode(),
        json.dumps(payload(1, 5), separators=(" , ", " : ")).encode(),
        orjson.dumps(payload(1, 5)).replace(b'"generation"', b'"gener\\u0061tion"'),
        orjson.dumps({k: v for k, v in payload(1, 5).items() if k != "generation"}),
    ],
)
def test_whitespace_escaped_names_and_a_missing_generation_are_not_repeats(raw: bytes) -> None:
    outcome = decode_entry("1-1", {b"v": b"1", b"imei": imei(1).encode(), b"payload": raw})
    assert type(outcome) is Record


def test_a_nul_inside_ascii_text_becomes_a_replacement_character_storable_in_jsonb() -> None:
    element = IoElement(256, "vin", size=-1, encoding="ascii")
    decode = compile_decoder(element)
    assert decode is not None
    assert decode(b"\x00\x00VIN\x00X\x00\x00") == "\ufffd\ufffdVIN\ufffdX"
