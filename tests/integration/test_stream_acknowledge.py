"""Acknowledging a batch without dead letters: one packed XACK against real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from processor.adapters import redis_stream
from processor.adapters.redis_stream import StreamSource
from processor.core.deadletter import DeadLetter
from processor.core.records import Rejection


def source(client: aioredis.Redis, prefix: str) -> StreamSource:
    return StreamSource(
        client,
        stream=f"{prefix}:records",
        group="g",
        consumer="c",
        dead_letter_stream=f"{prefix}:dead",
        max_deliveries=5,
        claim_idle_ms=60_000,
        count=1_000,
        block_ms=1,
    )


async def read_all(client: aioredis.Redis, stream: str, count: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(stream, {"v": "1", "n": str(n)})
    await pipe.execute()
    reply = await client.xreadgroup("g", "c", {stream: ">"}, count=count)
    return [raw.decode() for raw, _ in reply[0][1]]


@pytest.mark.parametrize("native", [True, False])
async def test_a_batch_is_acknowledged_whole_and_nothing_else(
    aredis: aioredis.Redis, stream_prefix: str, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    if not native:
        monkeypatch.setattr(redis_stream, "resp_bulks", None)  # the settle script instead
    elif redis_stream.resp_bulks is None:
        pytest.skip("C extension not built")
    src = source(aredis, stream_prefix)
    await src.ensure_group()
    ids = await read_all(aredis, src.stream, 25_000)
    await src.settle(ids[:20_000], [])
    pending = await aredis.xpending_range(src.stream, "g", min="-", max="+", count=30_000)
    assert [row["message_id"].decode() for row in pending] == ids[20_000:]
    await src.settle([], [])  # nothing to acknowledge: nothing sent
    await src.settle(ids[20_000:], [])
    assert await src.pending_count() == 0
    assert await aredis.xlen(f"{stream_prefix}:dead") == 0
    # The connection is back in the pool and usable.
    assert await aredis.ping()


async def test_dead_letters_still_go_through_the_script(
    aredis: aioredis.Redis, stream_prefix: str
) -> None:
    src = source(aredis, stream_prefix)
    await src.ensure_group()
    ids = await read_all(aredis, src.stream, 10)
    letter = DeadLetter.from_rejection(ids[3], Rejection("bad_type", "x"), {b"v": b"1"})
    await src.settle(ids, [letter])
    assert await src.pending_count() == 0
    dead = await aredis.xrange(f"{stream_prefix}:dead")
    assert [fields[b"source_id"].decode() for _, fields in dead] == [ids[3]]


def test_resp_bulks_packs_each_word() -> None:
    resp_bulks = pytest.importorskip("processor.core._speedups").resp_bulks
    assert resp_bulks(b"1-0 22-1  333-0") == (3, b"$3\r\n1-0\r\n$4\r\n22-1\r\n$5\r\n333-0\r\n")
    assert resp_bulks(b"") == (0, b"")
