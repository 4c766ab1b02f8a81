"""The decoder's reading of a raw XREADGROUP reply: the same records and rejections as
the contract decoder gives each entry, whatever the mix of entries and run boundaries."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from redis.exceptions import ResponseError

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
    monkeypatch.setattr(export_decode, "_read_raw", lambda *_args: None)  # the stub has no socket
    decoded = export_decode._read_with(Reply(items), spec, 1_000, 1, 65_536, 512)  # type: ignore[arg-type]
    records, rejections = decode_entries(zip(ids, entries, strict=True), 65_536, 512)
    assert decoded.chunk is not None
    assert decoded.chunk.equals(records_to_batch(records))
    assert decoded.rejections == [(sid, rejection) for sid, rejection, _ in rejections]
    assert decoded.rejected == [fields for _, _, fields in rejections]
    assert decoded.id_list() == ids


def test_a_raw_read_from_redis_gives_the_contract_decoders_rows(stream_prefix: str) -> None:
    """The reply read as bytes and built natively: the same rows and rejections as the
    contract decoder gives each entry read through redis-py, hostile entries included."""
    if not export_decode.NATIVE:
        pytest.skip("C extension not built")
    import redis

    from ..conftest import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    stream = f"{stream_prefix}:records"
    generated = generate(hostile=300, valid=2_000, seed=11)
    entries = [fields for fields in generated.entries if isinstance(fields, dict)]
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
    ids = [raw.decode() for raw in pipe.execute()]
    client.xgroup_create(stream, "g", id="0")
    spec = export_decode.StreamSpec(REDIS_URL, stream, "g", "c")
    raw = export_decode._raw_client(spec)
    try:
        first = export_decode._read_raw(raw, spec, 1_500, 1, 65_536, 512)
        second = export_decode._read_raw(raw, spec, 5_000, 1, 65_536, 512)
        third = export_decode._read_raw(raw, spec, 5_000, 1, 65_536, 512)  # BLOCK runs out
        assert first is not None
        assert second is not None
        assert third is export_decode.EMPTY
        assert first.id_list() + second.id_list() == ids
        stored = [
            {key.encode(): value for key, value in fields.items()}
            if isinstance(next(iter(fields)), str)
            else fields
            for fields in (client.xrange(stream))
        ]
        records, rejections = decode_entries(
            [(sid, fields) for sid, (_, fields) in zip(ids, stored, strict=True)], 65_536, 512
        )
        chunks = [d.chunk for d in (first, second) if d.chunk is not None]
        assert pa.concat_batches(chunks).equals(records_to_batch(records))
        got = first.rejections + second.rejections
        assert got == [(sid, rejection) for sid, rejection, _ in rejections]
        assert first.rejected + second.rejected == [fields for _, _, fields in rejections]
        assert len(got) >= 250  # the hostile entries, every kind
        assert client.xpending(stream, "g")["pending"] == len(ids)
        client.delete(stream)  # the group is gone with it: NOGROUP, as after a restart
        with pytest.raises(ResponseError, match=r"^NOGROUP"):
            export_decode._read_raw(raw, spec, 10, 1, 65_536, 512)
    finally:
        raw.close()
        client.close()


def test_a_reply_is_whole_only_at_its_last_byte() -> None:
    """resp_scan, fed a reply a few bytes at a time, says it is whole exactly at its end."""
    if not export_decode.NATIVE:
        pytest.skip("C extension not built")
    from processor.tools._export_columns import resp_scan

    reply = (
        b"*1\r\n*2\r\n$1\r\ns\r\n*3\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nv\r\n$1\r\n1\r\n"
        b"*2\r\n$3\r\n2-0\r\n*-1\r\n*2\r\n$3\r\n3-0\r\n*0\r\n"
    )
    for step in (1, 2, 3, 7):
        buffer = bytearray(len(reply) + 10)
        filled, pos, stack = 0, 0, (1,)
        while stack is not None:
            assert filled < len(reply), "whole before its last byte"
            chunk = reply[filled : filled + step]
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            pos, stack = resp_scan(buffer, filled, pos, stack)
        assert (pos, filled) == (len(reply), len(reply))
    for whole in (b"*-1\r\n", b"-NOGROUP no group\r\n", b"$5\r\nhello\r\n", b":12\r\n"):
        assert resp_scan(bytearray(whole), len(whole), 0, (1,)) == (len(whole), None)
    with pytest.raises(ValueError, match="RESP2"):
        resp_scan(bytearray(b"%1\r\n"), 4, 0, (1,))
