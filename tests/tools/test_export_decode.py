"""The decoder's reading of a raw XREADGROUP reply: the same records and rejections as
the contract decoder gives each entry, whatever the mix of entries and run boundaries."""

from __future__ import annotations

from typing import Any

import pytest

from processor.tools import export_decode
from processor.tools.export_decode import decode_entries, decode_read
from processor.tools.export_schema import records_to_batch

from ..faults.hostile import generate


def flat(fields: dict[Any, Any]) -> list[Any]:
    """An entry's field list as Redis replies it: name, value, name, value, …"""
    return [item for pair in fields.items() for item in pair]


@pytest.mark.parametrize("run", [1, 3, 1_000])
def test_a_reply_decodes_as_each_entry_alone(monkeypatch: pytest.MonkeyPatch, run: int) -> None:
    monkeypatch.setattr(export_decode, "RUN", run)
    generated = generate(hostile=400, valid=1_200, seed=3)
    entries = [fields for fields in generated.entries if isinstance(fields, dict)]
    entries.insert(
        5, {b"imei": entries[0][b"imei"], b"v": b"1", b"payload": entries[0][b"payload"]}
    )
    ids = [f"17-{n}" for n in range(len(entries))]
    flats = [flat(fields) for fields in entries]
    flats[7] = []  # an entry deleted since it was delivered: acknowledged only
    expected = decode_entries(
        [(sid, fields) for sid, fields, f in zip(ids, entries, flats, strict=True) if f],
        65_536,
        512,
    )
    got = decode_read(ids, flats, 65_536, 512)
    assert got == expected
    assert got[1]  # the mix holds rejections
    assert records_to_batch(got[0]).equals(records_to_batch(expected[0]))
