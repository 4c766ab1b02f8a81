"""The positions writer's two paths (direct COPY, staged ON CONFLICT) on real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from processor.adapters.mappings import UNKNOWN_DEVICE_RECORDS, MappingCache
from processor.adapters.positions_store import PositionsStore, init_connection
from processor.core import metrics
from processor.core.contract import decode_entry
from processor.core.records import Record
from processor.settings import Settings

from .pipeline_helpers import entry, stored_keys

pytestmark = pytest.mark.integration

ROWS = """
SELECT p.device_id, p.ts, p.received_at, p.lat, p.lon, p.alt, p.angle, p.satellites,
       p.speed, p.priority, p.event_io, p.codec, p.generation, p.io::text AS io, p.stream_id,
       a.attributes::text AS attributes, a.mapping_version
FROM positions p LEFT JOIN position_attributes a USING (device_id, ts)
ORDER BY p.device_id, p.ts
"""


def records(device: int, first: int, count: int) -> list[Record]:
    """Decoded records with every kind of field: sentinels, a generation, 64-bit IO."""
    out = []
    for i in range(first, first + count):
        io: dict[str, object] = {"239": 1, "66": 12_850 + i, "17": 65_535}
        if i % 2:
            io |= {"11": {"$bigint": "18446744073709551615"}, "256": {"$bytes": "V1ZX"}}
        fields = entry(device, i, io=io, generation=i % 3 or None)
        decoded = decode_entry(f"{1000 + i}-{device}", fields)
        assert isinstance(decoded, Record), decoded
        out.append(decoded)
    return out


@pytest.fixture
async def pool(settings: Settings, clean_db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(
        settings.database_dsn(), init=init_connection, min_size=1, max_size=3
    )
    try:
        yield created
    finally:
        await created.close()


async def store_for(pool: asyncpg.Pool, settings: Settings) -> PositionsStore:
    cache = MappingCache.from_settings(settings)
    async with pool.acquire() as conn:
        await cache.load(conn)
    store = PositionsStore(pool, settings, attributes=cache)
    await store.detect_layout()
    return store


def direct_count() -> float:
    return metrics.WRITE_PATH.labels("direct")._value.get()


async def test_direct_and_staged_paths_store_the_same_rows(
    settings: Settings, clean_db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    first, second = records(1, 0, 20), records(1, 20, 20)
    staged_store = await store_for(pool, settings)
    assert await staged_store.write(second) == 20  # a device never seen: staged
    staged = [dict(r) for r in await clean_db.fetch(ROWS)]
    await clean_db.execute("TRUNCATE positions, position_attributes")

    store = await store_for(pool, settings)
    assert await store.write(first) == 20
    before = direct_count()
    assert await store.write(second) == 20  # newer than the device's newest: direct
    assert direct_count() - before == 20
    direct = [dict(r) for r in await clean_db.fetch(ROWS)][20:]

    assert direct == staged
    assert orjson.loads(staged[1]["io"]) == {
        "11": 18446744073709551615,
        "17": 65535,
        "66": 12871,
        "239": 1,
        "256": "575657",
    }
    assert {row["generation"] for row in staged} == {None, 1, 2}
    assert all(row["attributes"] and row["mapping_version"] for row in staged)


async def test_a_direct_write_meeting_a_stored_key_is_redone_staged_and_stores_each_once(
    settings: Settings, clean_db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    store = await store_for(pool, settings)
    assert await store.write(records(2, 0, 10)) == 10
    later = records(2, 10, 10)
    other_writer = await store_for(pool, settings)  # e.g. another instance
    assert await other_writer.write(later[3:4]) == 1
    fallbacks = metrics.WRITE_FALLBACKS._value.get()
    unknown = UNKNOWN_DEVICE_RECORDS._value.get()

    assert await store.write(later) == 9

    assert metrics.WRITE_FALLBACKS._value.get() == fallbacks + 1
    # Decoded again for the staged write, the records of the unknown device count once.
    assert UNKNOWN_DEVICE_RECORDS._value.get() == unknown + 10
    keys = await stored_keys(clean_db)
    assert len(keys) == len(set(keys)) == 20
    assert await clean_db.fetchval("SELECT count(*) FROM position_attributes") == 20


async def test_late_and_resent_records_go_staged_and_count_once(
    settings: Settings, clean_db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    store = await store_for(pool, settings)
    batch = records(3, 0, 30)
    assert await store.write(batch[10:]) == 20
    before = direct_count()
    # Older than the newest stored (late), and already stored (resent): never direct.
    assert await store.write(batch[:10] + batch[25:]) == 10
    assert direct_count() == before
    keys = await stored_keys(clean_db)
    assert len(keys) == len(set(keys)) == 30


async def test_a_batch_repeating_records_stores_each_once_without_a_fallback(
    settings: Settings, clean_db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    store = await store_for(pool, settings)
    assert await store.write(records(4, 0, 5)) == 5
    fallbacks = metrics.WRITE_FALLBACKS._value.get()
    before = direct_count()

    assert await store.write(records(4, 5, 10) + records(4, 7, 2)) == 10

    assert direct_count() - before == 10  # the repeats went staged and were skipped there
    assert metrics.WRITE_FALLBACKS._value.get() == fallbacks
    keys = await stored_keys(clean_db)
    assert len(keys) == len(set(keys)) == 15
    assert await clean_db.fetchval("SELECT count(*) FROM position_attributes") == 15


@pytest.mark.parametrize("warm", [False, True], ids=["staged", "direct"])
async def test_of_records_repeating_a_key_the_first_in_the_batch_is_stored(
    settings: Settings, clean_db: asyncpg.Connection, pool: asyncpg.Pool, warm: bool
) -> None:
    store = await store_for(pool, settings)
    if warm:
        assert await store.write(records(5, 0, 1)) == 1
    batch = records(5, 1, 12)
    first = batch[0]
    for n in range(11):  # resends of the first record, later, between the others
        resend = records(5, 1, 1)[0]
        resend.received_at += 60_000 * (n + 1)
        resend.stream_id = f"1000-{n}"  # ids that sort before the first's as text
        batch.insert(2 * n + 2, resend)

    assert await store.write(batch) == 12

    stored = await clean_db.fetchval(
        "SELECT (extract(epoch FROM received_at) * 1000)::bigint FROM positions"
        " WHERE device_id = $1 AND ts = to_timestamp($2::float8 / 1000)",
        first.device_id,
        first.ts,
    )
    assert stored == first.received_at
