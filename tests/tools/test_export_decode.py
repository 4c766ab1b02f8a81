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


class Reply:
    """A client whose XREADGROUP returns one raw reply (as the decoder's client parses it)."""

    def __init__(self, items: list[list[Any]]) -> None:
        self.items = items

    def xreadgroup(self, *_args: Any, **_kwargs: Any) -> Any:
        return [[b"s", self.items]]


@pytest.mark.parametrize("native", [True, False])
def test_a_read_is_one_chunk_of_its_records_in_stream_order(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Through the native column builder (entries it leaves decoded one by one) or the
    Python runs: the contract decoder's records and rejections, in stream order."""
    if native and not export_decode.NATIVE:
        pytest.skip("C extension not built")
    if not native:
        monkeypatch.setattr(export_decode, "export_columns", None)
    monkeypatch.setattr(export_decode, "RUN", 7)
    generated = generate(hostile=60, valid=200, seed=8)
    entries = [fields for fields in generated.entries if isinstance(fields, dict)]
    ids = [f"18-{n}" for n in range(len(entries))]
    items = [[sid.encode(), flat(fields)] for sid, fields in zip(ids, entries, strict=True)]
    spec = export_decode.StreamSpec("redis://unused", "s", "g", "c")
    decoded = export_decode._read_with(Reply(items), spec, 1_000, 1, 65_536, 512)  # type: ignore[arg-type]
    records, rejections = decode_entries(zip(ids, entries, strict=True), 65_536, 512)
    assert decoded.chunk is not None
    assert decoded.chunk.equals(records_to_batch(records))
    assert decoded.rejections == [(sid, rejection) for sid, rejection, _ in rejections]
    assert decoded.rejected == [fields for _, _, fields in rejections]
    assert decoded.id_list() == ids
