"""Attribute backfill against real PostgreSQL: exact ranges, positions untouched, resumable."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from processor.adapters.mappings import MappingCache
from processor.adapters.migrations import migrate
from processor.settings import Settings
from processor.tools.backfill import Backfill, BackfillError, BackfillSpec

from ..conftest import reset_race_data

pytestmark = pytest.mark.integration

IMEI_A = 356307042441013  # FMB920
IMEI_B = 356307042441021  # FMC130
IMEI_C = 352094080000001  # not in devices: decoded with the default model (FMB920)
T0 = dt.datetime(2026, 5, 1, 10, 0, tzinfo=dt.UTC)
PER_DEVICE = 100


class Interrupted(Exception):
    pass


@pytest.fixture
async def db(clean_db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """Positions of three devices over 100 s; devices A (FMB920) and B (FMC130) registered.

    The FMB920 external_voltage multiplier is restored afterwards: the session database
    is shared with other tests.
    """
    conn = clean_db
    await reset_race_data(conn)
    await conn.execute("TRUNCATE processor.backfill_progress")
    for imei, model in ((IMEI_A, "FMB920"), (IMEI_B, "FMC130")):
        await conn.execute(
            """INSERT INTO devices (imei, device_model, label, active)
               SELECT $1, id, $1, true FROM device_models WHERE model = $2
               ON CONFLICT (imei) DO NOTHING""",
            str(imei),
            model,
        )
    await conn.executemany(
        """INSERT INTO positions (device_id, ts, received_at, lat, lon, alt, angle, satellites,
               speed, priority, event_io, codec, generation, io, stream_id)
           VALUES ($1, $2, $2, 45.1, 15.2, 100, 90, 9, 50, 0, 0, 142, NULL, $3::jsonb, '1-0')""",
        [
            (
                imei,
                T0 + dt.timedelta(seconds=i),
                json.dumps({"66": 12000 + i, "67": 4000, "239": 1, "256": "574657"}),
            )
            for imei in (IMEI_A, IMEI_B, IMEI_C)
            for i in range(PER_DEVICE)
        ],
    )
    try:
        yield conn
    finally:
        await set_multiplier(conn, "FMB920", 66, "0.001")
        await conn.execute(
            "DELETE FROM devices WHERE imei = ANY($1::text[])", [str(IMEI_A), str(IMEI_B)]
        )


async def set_multiplier(conn: asyncpg.Connection, model: str, io_id: int, value: str) -> None:
    await conn.execute(
        """UPDATE io_mappings SET multiplier = $3::numeric
           WHERE io_id = $2 AND device_model = (SELECT id FROM device_models WHERE model = $1)""",
        model,
        io_id,
        value,
    )


async def attributes(conn: asyncpg.Connection) -> dict[tuple[int, dt.datetime], dict[str, object]]:
    rows = await conn.fetch("SELECT device_id, ts, attributes::text AS a FROM position_attributes")
    return {(r["device_id"], r["ts"]): orjson.loads(r["a"]) for r in rows}


async def positions_digest(conn: asyncpg.Connection) -> str:
    return await conn.fetchval(
        "SELECT md5(string_agg(p::text, '|' ORDER BY device_id, ts)) FROM positions p"
    )


def spec(start_s: int = 0, end_s: int = PER_DEVICE, **kw: object) -> BackfillSpec:
    return BackfillSpec(T0 + dt.timedelta(seconds=start_s), T0 + dt.timedelta(seconds=end_s), **kw)  # type: ignore[arg-type]


async def backfill(conn: asyncpg.Connection, s: BackfillSpec, **kw: object) -> Backfill:
    job = Backfill(conn, s, MappingCache("FMB920", 1.0), **kw)  # type: ignore[arg-type]
    await job.prepare()
    await job.run()
    return job


async def test_a_changed_multiplier_changes_exactly_the_rows_in_the_range(
    db: asyncpg.Connection,
) -> None:
    await backfill(db, spec())
    before = await attributes(db)
    positions_before = await positions_digest(db)
    assert len(before) == 3 * PER_DEVICE
    assert before[(IMEI_A, T0)]["external_voltage"] == 12.0
    assert before[(IMEI_A, T0)]["ignition"] == "on"

    await set_multiplier(db, "FMB920", 66, "0.01")
    job = await backfill(db, spec(20, 60, model="FMB920"))

    after = await attributes(db)
    changed = {key for key in before if before[key] != after[key]}
    expected = {
        (imei, T0 + dt.timedelta(seconds=i)) for imei in (IMEI_A, IMEI_C) for i in range(20, 60)
    }
    assert changed == expected
    assert after[(IMEI_A, T0 + dt.timedelta(seconds=20))]["external_voltage"] == 120.2
    assert job.summary.rows_seen == job.summary.rows_changed == 80
    assert job.summary.selected_devices == 2
    assert await positions_digest(db) == positions_before


async def test_a_dry_run_counts_the_changes_and_writes_nothing(db: asyncpg.Connection) -> None:
    await backfill(db, spec())
    before = await attributes(db)
    await set_multiplier(db, "FMB920", 66, "0.01")
    job = await backfill(db, spec(0, 10, devices=(IMEI_A, IMEI_B)), dry_run=True)
    assert (job.summary.rows_seen, job.summary.rows_changed) == (20, 10)
    assert await attributes(db) == before


async def test_an_interrupted_backfill_resumes_after_the_last_chunk_and_ends_the_same(
    db: asyncpg.Connection, migrated_database: str
) -> None:
    await backfill(db, spec())
    await set_multiplier(db, "FMB920", 66, "0.01")

    writer = await asyncpg.connect(migrated_database)  # reading overlaps writing
    first = Backfill(db, spec(), MappingCache("FMB920", 1.0), chunk=25, writer=writer)
    await first.prepare()
    chunks = 0

    def stop_after_three(_: int) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 3:
            raise Interrupted

    try:
        with pytest.raises(Interrupted):
            await first.run(stop_after_three)
    finally:
        await writer.close()

    second = Backfill(db, spec(), MappingCache("FMB920", 1.0), chunk=25)
    todo = await second.prepare()
    assert todo == 3 * PER_DEVICE - 75
    summary = await second.run()
    assert summary.resumed_from is not None
    assert summary.rows_seen == 3 * PER_DEVICE
    assert summary.session_rows == 3 * PER_DEVICE - 75
    assert summary.rows_changed == 2 * PER_DEVICE  # A and C; B is an FMC130

    resumed = await attributes(db)
    await db.execute("TRUNCATE position_attributes")
    await backfill(db, spec(), restart=True)
    assert await attributes(db) == resumed

    again = await backfill(db, spec())  # finished: a rerun starts over, nothing to change
    assert again.summary.resumed_from is None
    assert again.summary.rows_changed == 0


async def test_migration_6_turns_stored_jsonb_attributes_into_json_with_the_same_content(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """An existing database: attributes stored as jsonb before migration 6. After it the
    column is json, every object reads the same, and a backfill with the same mappings
    finds nothing to change (content compared, not text)."""
    await backfill(db, spec())
    stored = await attributes(db)
    await db.execute("ALTER TABLE position_attributes ALTER COLUMN attributes TYPE jsonb")
    await db.execute("DELETE FROM processor.schema_migrations WHERE version = 6")
    try:
        assert await migrate(db, settings) == ["0006_attributes_json"]
    finally:  # the session database is shared: json again, whatever happened
        await db.execute(
            "ALTER TABLE position_attributes ALTER COLUMN attributes TYPE json"
            " USING attributes::json"
        )
        await db.execute(
            "INSERT INTO processor.schema_migrations (version, name, checksum)"
            " SELECT 6, 'attributes_json', 'restored' ON CONFLICT DO NOTHING"
        )
    column_type = await db.fetchval(
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_name = 'position_attributes' AND column_name = 'attributes'"
    )
    assert column_type == "json"
    assert await attributes(db) == stored
    text = await db.fetchval("SELECT attributes::text FROM position_attributes LIMIT 1")
    assert ": " in text  # still the text jsonb wrote, not the encoder's
    job = await backfill(db, spec())
    assert (job.summary.rows_seen, job.summary.rows_changed) == (3 * PER_DEVICE, 0)


async def test_a_model_without_mappings_or_an_empty_range_is_refused(
    db: asyncpg.Connection,
) -> None:
    with pytest.raises(BackfillError, match="no IO mappings"):
        await backfill(db, spec(model="XYZ1"))
    with pytest.raises(BackfillError, match="after"):
        await backfill(db, spec(50, 50))


def run_backfill_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(PROCESSOR_DATABASE_URL=database_url, PROCESSOR_LOG_FORMAT="console")
    return subprocess.run(
        [sys.executable, "-m", "processor", "backfill", "attributes", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_prints_a_summary(db: asyncpg.Connection, migrated_database: str) -> None:
    end_ms = str(int((T0 + dt.timedelta(seconds=30)).timestamp() * 1000))
    result = run_backfill_cli(
        migrated_database,
        *("--from", "2026-05-01T10:00:00Z", "--to", end_ms),
        *("--device", str(IMEI_A), "--chunk", "7"),
    )
    assert result.returncode == 0, result.stderr
    assert "positions read: 30 in 5 chunk(s)" in result.stdout
    assert "attribute rows changed: 30" in result.stdout
