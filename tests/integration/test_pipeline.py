"""The throughput pipeline against real Redis and PostgreSQL, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from processor.adapters.errors import is_transient
from processor.adapters.positions_store import PositionsStore, init_connection
from processor.adapters.redis_stream import DeadLetter
from processor.core.pipeline import Pipeline
from processor.core.records import Record
from processor.core.state import DeviceStates
from processor.service import pipeline_config, serve, stream_source
from processor.settings import Settings

from .pipeline_helpers import MALFORMED, entry, imei, shuffled, stored_keys, xadd_all

pytestmark = pytest.mark.integration


async def drain(settings: Settings) -> None:
    await asyncio.wait_for(serve(settings, asyncio.Event(), burst=True), timeout=60)


async def test_duplicates_and_shuffled_order_store_each_record_once(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    valid = [entry(d, i) for d in range(5) for i in range(200)]
    resent = valid[::10]
    await xadd_all(aredis, settings.stream, shuffled(valid + resent + valid[:50]))

    await drain(settings)

    keys = await stored_keys(clean_db)
    assert len(keys) == len(set(keys)) == 1000
    assert {k[0] for k in keys} == {int(imei(d)) for d in range(5)}
    assert (await aredis.xpending(settings.stream, settings.group))["pending"] == 0


async def test_malformed_entries_are_dead_lettered_with_their_reason(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    await xadd_all(aredis, settings.stream, [entry(1, i) for i in range(10)])
    await xadd_all(aredis, settings.stream, [fields for fields, _ in MALFORMED])

    await drain(settings)

    dead = await aredis.xrange(settings.dead_letter_stream)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert reasons == [reason for _, reason in MALFORMED]
    first = dead[0][1]
    assert set(first) == {b"source_id", b"reason", b"detail", b"fields", b"failed_at"}
    assert orjson.loads(first[b"fields"])["payload"] == "{not json"
    assert len(await stored_keys(clean_db)) == 10
    assert (await aredis.xpending(settings.stream, settings.group))["pending"] == 0


async def test_stored_row_keeps_every_field_and_64_bit_io_exactly(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    io = {"78": {"$bigint": "18446744073709551615"}, "256": {"$bytes": "QUJD"}, "239": 1}
    await xadd_all(aredis, settings.stream, [entry(3, 5, io=io, alt=-12, lat=-33.5)])

    await drain(settings)

    row = await clean_db.fetchrow("SELECT * FROM positions")
    assert row is not None
    assert row["device_id"] == int(imei(3))
    assert (row["alt"], row["lat"], row["satellites"]) == (-12, -33.5, 11)
    io_text = await clean_db.fetchval("SELECT io::text FROM positions")
    assert orjson.loads(io_text) == {"78": 18446744073709551615, "256": "414243", "239": 1}
    assert "18446744073709551615" in io_text


async def test_an_entry_delivered_too_often_is_dead_lettered(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    await aredis.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    await xadd_all(aredis, settings.stream, [entry(1, 1)])
    for _ in range(settings.max_deliveries):  # a consumer that keeps dying before XACK
        await aredis.xreadgroup(settings.group, settings.consumer, {settings.stream: "0"})
    await aredis.xreadgroup(settings.group, settings.consumer, {settings.stream: ">"})
    for _ in range(settings.max_deliveries - 1):
        await aredis.xreadgroup(settings.group, settings.consumer, {settings.stream: "0"})

    await drain(settings)

    dead = await aredis.xrange(settings.dead_letter_stream)
    assert [fields[b"reason"] for _, fields in dead] == [b"max_deliveries"]
    assert await stored_keys(clean_db) == []
    assert (await aredis.xpending(settings.stream, settings.group))["pending"] == 0


async def test_attributes_are_decoded_with_the_default_model_in_the_same_commit(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    await xadd_all(aredis, settings.stream, [entry(4, i) for i in range(20)])

    await drain(settings)

    rows = await clean_db.fetch(
        "SELECT p.device_id, a.attributes::text AS attributes FROM positions p"
        " JOIN position_attributes a USING (device_id, ts)"
    )
    assert len(rows) == 20
    attributes = orjson.loads(rows[0]["attributes"])
    assert attributes["external_voltage"] == 12.85  # IO 66 = 12850 mV, multiplier 0.001
    assert attributes["ignition"] == "on"


async def test_batches_in_the_database_at_once_are_handed_on_and_acknowledged_in_order(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    settings = settings.model_copy(
        update={"batch_max_size": 50, "read_count": 50, "write_concurrency": 3}
    )
    await xadd_all(aredis, settings.stream, [entry(1, i) for i in range(200)])
    pool = await asyncpg.create_pool(
        settings.database_dsn(), init=init_connection, min_size=1, max_size=4
    )
    store = PositionsStore(pool, settings)
    await store.detect_layout()
    events: list[str] = []

    class FirstBatchSlow:
        """The first batch takes longest, so later ones commit before it."""

        async def write(self, records: Sequence[Record]) -> int:
            n = sum(e.startswith("start") for e in events) + 1
            events.append(f"start {n}")
            if n == 1:
                await asyncio.sleep(0.5)
            new = await store.write(records)
            events.append(f"end {n}")
            return new

    source = stream_source(aredis, settings)
    await source.ensure_group()
    settle = source.settle
    acknowledged: list[str] = []
    handed_on: list[int] = []

    async def settle_after_commit(ids: Sequence[str], dead: Sequence[DeadLetter]) -> None:
        committed = await clean_db.fetchval(
            "SELECT count(*) FROM positions WHERE stream_id = ANY($1::text[])", list(ids)
        )
        assert committed == len(ids)  # nothing is acknowledged before its commit
        acknowledged.append(ids[0])
        await settle(ids, dead)

    async def hook(records: list[Record]) -> None:
        handed_on.append(records[0].ts)

    source.settle = settle_after_commit  # type: ignore[method-assign]
    pipeline = Pipeline(
        source,
        FirstBatchSlow(),
        pipeline_config(settings),
        states=DeviceStates(100),
        transient=is_transient,
        hooks=[("order", hook)],
    )
    try:
        await asyncio.wait_for(pipeline.run(asyncio.Event(), burst=True), timeout=30)
    finally:
        await pool.close()

    assert len(events) == 8
    assert events.index("end 2") < events.index("end 1")  # written during the first
    assert len(handed_on) == 4
    assert handed_on == sorted(handed_on)
    assert acknowledged == sorted(acknowledged, key=lambda sid: tuple(map(int, sid.split("-"))))
    assert len(await stored_keys(clean_db)) == 200
    assert (await aredis.xpending(settings.stream, settings.group))["pending"] == 0
